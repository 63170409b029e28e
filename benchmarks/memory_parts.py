"""The parts of training/memory.py that were measured one by one, RSS at points (tracemalloc does not see torch).

    LD_PRELOAD=<tbbmalloc> python benchmarks/memory_parts.py generation
    LD_PRELOAD=<tbbmalloc> torchrun --nproc_per_node 2 benchmarks/memory_parts.py fsdp2
    LD_PRELOAD=<tbbmalloc> python benchmarks/memory_parts.py evaluation [CONFIG]
    LD_PRELOAD=<tbbmalloc> python benchmarks/memory_parts.py run_sequence [CONFIG]

(<tbbmalloc>: `python -c "from lorafit.allocator import tbbmalloc_libraries as t; print(':'.join(t()))"`, the
allocator `lorafit run` uses.) `generation`: SmolLM2-135M (fp32, `lorafit models prepare smollm2-135m`) after one
forward (as after training), then greedy generation of 64 prompts x 65 tokens, 1 and 24 new tokens, peak RSS over
the warmed process (VmHWM reset through /proc/self/clear_refs) against the KV cache + prefill intermediates that
memory.py counts (with the linears stored as NF4 first, `lorafit.frozen.nf4.store_nf4_linears`, after
`requires_grad_(False)`: +473 MiB instead of +452, 2026-12-07). `fsdp2`: a SmolLM2-sized root (embedding
49152 x 576) and 30 blocks under fully_shard on 2 gloo ranks, RSS after unsharding the root and one block.
`evaluation`: the run a config builds (default: the comparison task, configs/smollm2_135m_hard_lora.yaml), after
one forward, then its exact-match evaluator as `lorafit run` calls it (its batch, prompts and max_new_tokens),
each variant in a fresh process: through the plain model (LoRA removed), through the LoRA-adapted unmerged model,
and the held-out loss pass before the generation, as `ExactMatchEvaluator.run` does. `run_sequence`: the whole
`lorafit run` of a config (10 steps), RSS and its anonymous / file-backed parts at the evaluation after training
(before the loss pass, after it, the generation's peak), once as it runs and once without the evaluation before
training. Prints one dict per process (per variant).
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


HARD = "configs/smollm2_135m_hard_lora.yaml"
SHORT = (  # the memory_prediction.py case's run: 10 steps, checkpoint and evaluation at the end only
    "settings.training_target.num_target_steps=10",
    "settings.intervals.checkpointing_interval_in_steps=1000",
    "settings.intervals.evaluation_interval_in_steps=1000",
)


def _fresh(what: str, config: str, variant: str) -> None:
    """Run `what` for one variant in its own process (the allocator's cache starts empty), environment inherited."""
    import subprocess

    subprocess.run([sys.executable, __file__, what, config, variant], check=True)


def evaluation(config: str = HARD, variant: str | None = None) -> dict[str, float] | None:
    if variant is None:
        for v in ("plain", "lora", "lora+loss"):
            _fresh("evaluation", config, v)
        return None
    import gc

    from lorafit.evaluation.exact_match import _prompt_ids, evaluate_exact_match, heldout_loss
    from lorafit.lora.model import remove_lora
    from lorafit.run.build import build_run, load_run_config

    _, graph = load_run_config(Path(config), None, SHORT)
    run = build_run(graph)
    model = remove_lora(run.model) if variant == "plain" else run.model
    evaluator = run.evaluators[0]
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 128)))  # the first forward (memory.py's allocator part)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    out = {"warmed": status("VmRSS")}
    out["prompt tokens (longest)"] = max(len(_prompt_ids(run.tokenizer, ex)) for ex in evaluator.examples)
    batch = evaluator.config.batch_size
    if "loss" in variant:
        heldout_loss(model, run.tokenizer, evaluator.examples, batch_size=batch)
        out["loss: peak over warmed"] = status("VmHWM") - out["warmed"]
        out["loss: kept after"] = status("VmRSS") - out["warmed"]
    new = evaluator.config.max_new_tokens
    evaluate_exact_match(model, run.tokenizer, evaluator.examples, max_new_tokens=new, batch_size=batch)
    out["generation: peak over warmed"] = status("VmHWM") - out["warmed"]
    print(variant, config, end=" ")
    return out


def run_sequence(config: str = HARD, variant: str | None = None) -> dict[str, float] | None:
    if variant is None:
        for v in ("as run", "no evaluation before training"):
            _fresh("run_sequence", config, v)
        return None
    import tempfile

    import lorafit.evaluation.exact_match as exact_match
    import lorafit.run.runner as runner

    out: dict[str, float] = {}
    after = [False]

    def mark(name: str) -> None:
        if after[0]:
            for key in ("VmRSS", "RssAnon", "RssFile"):
                out[f"{name}: {key}"] = status(key)
            out[f"{name}: VmHWM"] = status("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")

    def wrap(function, before: str, done: str):
        def measured(*args, **kwargs):
            mark(before)
            result = function(*args, **kwargs)
            mark(done)
            return result

        return measured

    exact_match.heldout_loss = wrap(exact_match.heldout_loss, "before loss", "after loss")
    exact_match.evaluate_exact_match = wrap(exact_match.evaluate_exact_match, "before generation", "generation")
    evaluators = runner.run_evaluators

    def run_evaluators(built, run_dir, when, *args, **kwargs):
        after[0] = when == "after"
        result = None if when == "before" and variant != "as run" else evaluators(built, run_dir, when, *args, **kwargs)
        Path("/proc/self/clear_refs").write_text("5")  # "before loss: VmHWM" is then training's peak
        return result

    runner.run_evaluators = run_evaluators
    with tempfile.TemporaryDirectory() as tmp:
        runner.run(runner.RunRequest(Path(config), Path(tmp), "memory_parts", overrides=SHORT))
    print(variant, config, end=" ")
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "generation"
    cases = {"generation": generation, "fsdp2": fsdp2, "evaluation": evaluation, "run_sequence": run_sequence}
    result = cases[what](*sys.argv[2:])
    if result is not None:
        print({k: round(v) for k, v in result.items()}, flush=True)
