"""LoRA under FSDP2 on CPU (gloo, 2 processes): meta build -> inject -> fully_shard -> load -> seeded init.

Shows the DTensor paths: a seeded reset gives the same adapter as one process, the gathered adapter
state dict is the full tensors (not rank 0's slice), loading an adapter into a sharded model and the
sharded forward agree with the unsharded model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cli_run import spawn_ranks

TESTS = str(Path(__file__).resolve().parents[1])


def _worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    from lorafit.errors import UserError
    from lorafit.lora import (
        adapter_state_dict,
        apply_lora,
        load_adapter,
        merge_lora,
        reset_lora_parameters,
        save_adapter,
    )
    from lorafit.lora.layers import copy_full_tensor
    from tiny import llama_config, make_llama

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        base = make_llama()
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config())
        apply_lora(model, r=4, alpha=8, target_layers=["q_proj", "v_proj", "down_proj"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        params = dict(model.named_parameters())
        for name, value in base.state_dict().items():
            if name in params:
                copy_full_tensor(params[name], value)
        for name, buffer in base.named_buffers():
            model.get_buffer(name).copy_(buffer)
        reset_lora_parameters(model, seed=7)

        single = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "v_proj", "down_proj"], seed=7)
        expected = adapter_state_dict(single)
        gathered = adapter_state_dict(model)  # DTensors: full_tensor() on every rank
        assert gathered.keys() == expected.keys()
        assert all(torch.equal(gathered[k], expected[k]) for k in expected), "seeded init depends on sharding"

        # an adapter with real values loads into the sharded model; the sharded forward equals one process
        adapter = Path(folder) / "trained"
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in single.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if rank == 0:
            save_adapter(single, adapter)
        dist.barrier()
        load_adapter(model, adapter)
        x = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(x).logits, single(x).logits, rtol=0, atol=1e-5)
        try:
            merge_lora(model)
            raise AssertionError("merged into shards")
        except UserError as error:
            assert "sharded" in str(error)

        # the engine's path: gather a full state dict (it holds the tied frozen lm_head too) and save on rank 0
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(model, options=options)
        if rank == 0:
            save_adapter(model, Path(folder) / "resaved", state_dict=full)
            written = load_file(str(Path(folder) / "resaved" / "adapter_model.safetensors"))
            reference = load_file(str(adapter / "adapter_model.safetensors"))
            assert written.keys() == reference.keys()
            assert all(torch.equal(written[k], reference[k]) for k in reference)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_lora_under_fsdp2_two_processes(tmp_path):
    spawn_ranks(_worker, str(tmp_path))
    assert (tmp_path / "resaved" / "adapter_config.json").exists()
