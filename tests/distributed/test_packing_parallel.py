"""Packing under 2-process FSDP2 (gloo, CPU): packed blocks sharded over ranks train exactly like their documents
run one by one in a single process (loss and gathered LoRA gradients, fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_run import spawn_ranks

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
KINDS = ("text", "chat")


def _worker(rank: int, world: int, folder: str, prefixes: dict[str, str]) -> None:
    from engine_cases import lora_model
    from lorafit.datasets.packed import Collator
    from lorafit.distributed.env import init_distributed
    from lorafit.distributed.parallel import FSDP2Strategy
    from lorafit.training.loss import CausalLMLoss
    from packing_cases import count_targets, loss_and_grads, packed_dataset

    env = init_distributed()
    results = {}
    try:
        for kind in KINDS:
            dataset = packed_dataset(kind, Path(prefixes[kind]))
            collate = Collator(pad_token_id=dataset.pad_token_id)
            everything = [dataset[i] for i in range(len(dataset))]
            n_targets = count_targets([collate(everything)])
            mine = collate(everything[rank::world])  # this rank's blocks, one micro-batch
            loss_fn = FSDP2Strategy().wrap(CausalLMLoss(lora_model()), env)
            # FSDP2 averages gradients over ranks: x world makes them the global sum, as the training loop does
            loss, grads = loss_and_grads(loss_fn, [mine], world / n_targets)
            total = torch.tensor([loss], dtype=torch.float64)
            env.all_reduce_sum(total)
            results[kind] = (float(total), grads, len(dataset))
        if rank == 0:
            torch.save(results, f"{folder}/results.pt")
    finally:
        env.destroy()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer):
    from packing_cases import pack_cases

    folder = tmp_path_factory.mktemp("packing_fsdp2")
    prefixes = {kind: str(prefix) for kind, prefix in pack_cases(folder, tiny_tokenizer).items()}
    spawn_ranks(_worker, str(folder), prefixes)
    return prefixes, torch.load(folder / "results.pt", weights_only=False)


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_packed_blocks_equal_documents_one_by_one(sharded, kind):
    from engine_cases import lora_model
    from packing_cases import count_targets, loss_and_grads, packed_dataset, separate_documents

    prefixes, results = sharded
    loss, grads, n_blocks = results[kind]
    assert n_blocks >= 3  # both ranks hold blocks
    separate = separate_documents(kind, packed_dataset(kind, Path(prefixes[kind])))
    n_targets = count_targets(separate)
    expected_loss, expected = loss_and_grads(lora_model(), separate, 1 / n_targets)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected.keys() and any("lora_A" in k for k in grads) and any("lora_B" in k for k in grads)
    for name, grad in expected.items():
        assert grads[name].shape == grad.shape, name  # gathered, not one rank's shard
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().max() > 0 for g in expected.values())
