"""The run stops, naming the cause, when adapters get no gradient or the loss stops being finite."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration  # each test runs the training loop until it stops


def _job(tmp_path, **overrides):
    from engine_cases import make_job
    from lorafit.distributed.env import init_distributed

    settings = {"micro": 2, "accum": 1, "steps": 4, "eval_datasets": {}} | overrides
    return make_job(tmp_path, init_distributed(), **settings)


def test_adapters_cut_from_the_graph_are_named(tmp_path):
    from lorafit.training.checks import GradientFlowError
    from lorafit.training.loop import train

    job = _job(tmp_path)
    for name, module in job.model.named_modules():
        if name.endswith("q_proj"):  # the LoRA layer's output no longer depends on its adapter
            module.register_forward_hook(lambda m, args, out: out.detach())
    with pytest.raises(GradientFlowError) as error:
        train(job)
    message = str(error.value)
    assert "after step 1" in message and "no gradient" in message
    assert "model.layers.0.self_attn.q_proj.lora_B.weight" in message
    assert "model.layers.1.self_attn.q_proj.lora_B.weight" in message
    assert "v_proj" not in message and "lora_A" not in message  # only what is cut; A is checked from step 2
    assert not (tmp_path / "adapter").exists()


def test_steps_without_targets_do_not_count_as_broken_adapters(tmp_path, capsys):
    """Packed instruction data can open with blocks that are all prompt: zero gradients there are right, so the
    gradient-flow check waits for the first steps that have targets (and still runs then)."""
    from engine_cases import TokenDataset
    from lorafit.training.loop import train

    class PromptFirst(TokenDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i < 4:  # the first two global batches (2 samples each): no target token
                item["labels"][:] = -100
            return item

    job = _job(tmp_path, train_dataset=PromptFirst(), shuffle=False, steps=5)
    result = train(job)
    assert result.steps == 5 and result.losses[0][1] == 0.0 and result.losses[2][1] > 0
    assert "no target token" in capsys.readouterr().err


def test_lora_a_without_gradient_fails_at_step_two(tmp_path):
    import types

    import torch.nn.functional as F  # noqa: N812

    from lorafit.training.checks import GradientFlowError
    from lorafit.training.loop import train

    def branch_without_a(self, x):  # B still learns from A's (detached) output; A learns nothing
        return F.linear(F.linear(x, self.lora_A.weight).detach(), self.lora_B.weight) * self.scaling

    job = _job(tmp_path)
    for name, module in job.model.named_modules():
        if name.endswith("down_proj"):
            module._lora_branch = types.MethodType(branch_without_a, module)
    with pytest.raises(GradientFlowError, match="after step 2") as error:
        train(job)
    assert "model.layers.0.mlp.down_proj.lora_A.weight" in str(error.value)
    assert "lora_B" not in str(error.value)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from lorafit.checkpoint.state import find_latest, list_checkpoints
    from lorafit.training.checks import NonFiniteLossError
    from lorafit.training.loop import train

    job = _job(tmp_path, checkpointing_interval_in_steps=2)
    calls = []

    def poison(module, args, out):  # from the third training forward on, the hidden states are NaN
        calls.append(1)
        return out * float("nan") if len(calls) >= 3 else out

    job.model.model.norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError) as error:
        train(job)
    message = str(error.value)
    assert "step 3" in message and "loss is nan" in message and "step_000002" in message
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and find_latest(tmp_path) is not None
