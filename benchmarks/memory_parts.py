"""The parts of training/memory.py that were measured one by one, RSS at points (tracemalloc does not see torch).

    LD_PRELOAD=<tbbmalloc> python benchmarks/memory_parts.py generation
    LD_PRELOAD=<tbbmalloc> torchrun --nproc_per_node 2 benchmarks/memory_parts.py fsdp2

(<tbbmalloc>: `python -c "from lorafit.allocator import tbbmalloc_libraries as t; print(':'.join(t()))"`, the
allocator `lorafit run` uses.) `generation`: SmolLM2-135M (fp32, `lorafit models prepare smollm2-135m`) after one
forward (as after training), then greedy generation of 64 prompts x 65 tokens, 1 and 24 new tokens, peak RSS over
the warmed process (VmHWM reset through /proc/self/clear_refs) against the KV cache + prefill intermediates that
memory.py counts (with the linears stored as NF4 first, `lorafit.frozen.nf4.store_nf4_linears`, after
`requires_grad_(False)`: +473 MiB instead of +452, 2026-12-07). `fsdp2`: a SmolLM2-sized root (embedding
49152 x 576) and 30 blocks under fully_shard on 2 gloo ranks, RSS after unsharding the root and one block.
Prints one dict per process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "SmolLM2-135M"


def status(key: str) -> float:
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) / 1024


def generation() -> dict[str, float]:
    import gc

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for p in model.parameters():
        if type(p.data) is torch.Tensor:  # not a subclass (NF4): it keeps its data in inner tensors
            p.data = p.data.clone()  # out of the file mapping, as a run holds them
    with torch.no_grad():
        model(torch.randint(0, 49152, (2, 128)))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    out = {"warmed": status("VmRSS")}
    ids = torch.randint(100, 49152, (64, 65))
    for new in (1, 24):
        Path("/proc/self/clear_refs").write_text("5")
        start = status("VmRSS")
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        out[f"peak over warmed, {new} new"] = status("VmHWM") - out["warmed"]
        out[f"kept after, {new} new"] = status("VmRSS") - start
    out["kv cache (24 new)"] = 64 * (65 + 24) * 30 * 2 * 192 * 4 / 2**20
    out["prefill intermediates"] = 64 * 65 * (3 * 1536 + 4 * 576) * 4 / 2**20
    return out


def fsdp2() -> dict[str, float]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    class Block(nn.Module):  # SmolLM2's decoder block's linear weights (13.5 MiB)
        def __init__(self):
            super().__init__()
            shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
            self.linears = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(49152, 576)
            self.blocks = nn.ModuleList(Block() for _ in range(30))

    with torch.device("meta"):
        model = Model()
    model.requires_grad_(False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_()
    out = {"sharded": status("VmRSS")}
    model.unshard()
    out["root unsharded"] = status("VmRSS")
    model.reshard()
    out["root resharded"] = status("VmRSS")
    model.blocks[0].unshard()
    out["block unsharded"] = status("VmRSS")
    model.blocks[0].reshard()
    out["block resharded"] = status("VmRSS")
    dist.destroy_process_group()
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "generation"
    result = {"generation": generation, "fsdp2": fsdp2}[what]()
    print({k: round(v) for k, v in result.items()}, flush=True)
