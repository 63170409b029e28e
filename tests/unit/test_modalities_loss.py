"""The loss of a Modalities config is Modalities': each micro-batch's token mean, averaged over the micro-batches of
a step (CLMCrossEntropyLoss with reduction='mean', loss / gradient_acc_steps), computed here independently."""

import pytest
import torch

from engine_cases import TokenDataset, make_job

pytestmark = pytest.mark.integration  # two one-step runs of the training loop


def test_micro_batch_mean_is_modalities_loss(tmp_path):
    from lorafit.distributed.env import init_distributed
    from lorafit.training.loop import train
    from tiny import make_llama

    env = init_distributed()
    data = TokenDataset()
    assert data.masked[0] != data.masked[1]  # the two micro-batches hold different numbers of targets
    result = {}
    for mode in ("micro_batch_mean", "global_tokens"):
        job = make_job(
            tmp_path / mode,
            env,
            micro=1,
            accum=2,
            steps=1,
            shuffle=False,
            eval_datasets={},
            train_dataset=data,
            loss_normalization=mode,
            progress=False,
            write_adapter=False,
        )
        result[mode] = train(job).losses[0][1]
    base = make_llama()  # LoRA's B starts at zero: the first step's loss is the base model's
    with torch.no_grad():
        means, sums, counts = [], [], []
        for i in (0, 1):  # no shuffle, one process: step 1 = samples 0 and 1, one per micro-batch
            item = data[i]
            logits = base(item["input_ids"][None]).logits[0]
            ce = torch.nn.functional.cross_entropy(logits, item["labels"], ignore_index=-100, reduction="sum")
            n = int((item["labels"] != -100).sum())
            means.append(float(ce) / n)
            sums.append(float(ce))
            counts.append(n)
    assert abs(result["micro_batch_mean"] - sum(means) / 2) < 3e-5
    assert abs(result["global_tokens"] - sum(sums) / sum(counts)) < 3e-5
    assert abs(sum(means) / 2 - sum(sums) / sum(counts)) > 2e-4  # the two rules differ on this batch (by 3e-4)
