"""Parallelism components and the process environment, in one process."""

from __future__ import annotations

import pytest
import torch


def test_single_process_env_needs_no_process_group(monkeypatch):
    import torch.distributed as dist

    from lorafit.distributed.env import init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.device.type, env.backend) == (0, 1, "cpu", None)
    assert not dist.is_initialized() and not env.distributed
    assert env.broadcast_object({"a": 1}) == {"a": 1} and env.all_gather_object(3) == [3]
    assert env.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    env.barrier()


def test_bad_torchrun_environment_is_a_user_error(monkeypatch):
    from lorafit.distributed.env import init_distributed
    from lorafit.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        init_distributed(device="cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        init_distributed(device="cpu")


def test_components_are_registered_with_their_config():
    from pydantic import ValidationError

    import lorafit.distributed.parallel as parallel
    from lorafit.config.registry import REGISTRY

    for variant, cls in (("none", parallel.Strategy), ("ddp", parallel.DDPStrategy), ("fsdp2", parallel.FSDP2Strategy)):
        spec = REGISTRY.get("parallelism", variant)
        strategy = spec.builder(spec.config_model.model_validate({"mixed_precision": "bf16"}))
        assert type(strategy) is cls and strategy.config.mixed_precision == "bf16"
    with pytest.raises(ValidationError):
        parallel.ParallelismConfig.model_validate({"mixed_precision": "fp16"})
    with pytest.raises(ValidationError):
        parallel.ParallelismConfig.model_validate({"sharding": "full"})


def test_decoder_blocks_come_from_no_split_modules():
    from lorafit.distributed.parallel import decoder_blocks
    from tiny import make_llama

    model = make_llama()
    blocks = decoder_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]
    assert blocks[0] is model.model.layers[0]
    assert decoder_blocks(torch.nn.Linear(2, 2)) == []


def _loss_and_grads(strategy):
    from lorafit.distributed.env import init_distributed
    from lorafit.lora import apply_lora, named_lora_parameters
    from lorafit.models.wrappers import unwrap
    from lorafit.training.loss import CausalLMLoss
    from tiny import make_llama

    model = apply_lora(make_llama(), r=4, alpha=8, target_layers=["q_proj", "down_proj"], seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    loss_fn = strategy.wrap(CausalLMLoss(model), init_distributed(device="cpu")).train()
    model = unwrap(loss_fn)
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with strategy.autocast(init_distributed(device="cpu")):
        loss = loss_fn(input_ids=ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in named_lora_parameters(model)}, model


def test_activation_checkpointing_keeps_names_values_and_gradients():
    from lorafit.distributed.parallel import ParallelismConfig, Strategy

    loss, grads, _ = _loss_and_grads(Strategy())
    ac_loss, ac_grads, model = _loss_and_grads(Strategy(ParallelismConfig(activation_checkpointing=True)))
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in dict(model.named_parameters())  # no wrapper prefix
    torch.testing.assert_close(ac_loss, loss)
    assert grads.keys() == ac_grads.keys()
    for name in grads:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        torch.testing.assert_close(ac_grads[name], grads[name], msg=name)


def test_bf16_autocast_on_cpu_trains_in_bf16_with_fp32_adapters():
    from lorafit.distributed.parallel import ParallelismConfig, Strategy

    loss, _grads, _model = _loss_and_grads(Strategy())
    bf16_loss, bf16_grads, bf16_model = _loss_and_grads(Strategy(ParallelismConfig(mixed_precision="bf16")))
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())
    assert all(g.dtype == torch.float32 for g in bf16_grads.values())
    assert bf16_loss.item() != loss.item() and abs(bf16_loss.item() - loss.item()) < 0.05
