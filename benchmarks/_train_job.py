"""One training job, described once and run by either contender in its own process.

`TrainSpec` is what both contenders get (as JSON): the model folder, the packed data, the tokens per step, the
steps, the learning-rate schedule (cosine to zero, no warmup: the one schedule both tools define identically;
their warmups differ by one step), AdamW's settings, gradient clipping, the LoRA settings and the initial
adapter. The data is a lorafit packed file read in order (no shuffling) by both, so step s of either contender
sees the same token blocks. `prepare_job` packs the text and writes the initial adapter that both contenders
load, so their loss curves start from the same weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, LORA_TARGETS, REPO, alternating, fmt, run_child

TEXT = REPO / "data" / "lorem_ipsum" / "lorem_ipsum.txt"
TASK = REPO / "data" / "task" / "train.jsonl"  # the main job's instruction data
DATA_CHOICES = {
    "text": "plain text (the sample lorem ipsum, repeated): every token is a target",
    "instruction": "the main job's conversations packed into blocks, loss on the answers only (29% of the tokens)",
}


@dataclass
class TrainSpec:
    model: str
    data_prefix: str
    sequence_length: int = 256
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    steps: int = 12
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    mode: str = "lora"  # lora | full
    r: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init_adapter: str | None = None  # the adapter both contenders start from
    # how the contender runs the job (its own settings; the job above stays the same)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    activation_checkpointing: bool = False
    compile: bool = False
    frozen_dtype: str | None = None  # lorafit only: frozen linear weights stored in this dtype (model/lora)
    nf4_skip_targets: bool = False  # lorafit only, with nf4: the adapted layers stored in bf16 (nf4_skip_layers)
    loss_chunk_tokens: int | None = 256  # lorafit only: target positions per chunk of the fused head + CE
    threads: int | None = None
    # glibc's M_MMAP_THRESHOLD in bytes (None: glibc's default, a threshold that rises up to 32 MiB as large
    # blocks are freed, after which activations come from the heap, which fragments and keeps its pages)
    mmap_threshold: int | None = None
    # the process's malloc: tbbmalloc | system (glibc); None: the tool's default, i.e. what `lorafit run` does for
    # lorafit (tbbmalloc, lorafit/allocator.py) and glibc for the Trainer
    allocator: str | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.sequence_length * self.micro_batch_size * self.gradient_accumulation_steps

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> TrainSpec:
        return cls(**json.loads(Path(path).read_text()))


def prepare_job(model: Path, work: Path, spec_values: dict[str, Any], data: str = "text") -> TrainSpec:
    """Pack the data for all steps (see DATA_CHOICES) and write the initial adapter."""
    from transformers import AutoTokenizer

    from lorafit.data.token_files import pack_file

    work.mkdir(parents=True, exist_ok=True)
    spec = TrainSpec(model=str(model), data_prefix=str(work / "packed"), **spec_values)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if data == "instruction":  # labels of prompt tokens are -100 in the packed blocks
        pack_file(TASK, tokenizer, spec.data_prefix, fmt="instruction", overwrite=True, progress=False)
    elif data == "text":
        text = TEXT.read_text()
        per_copy = len(tokenizer(text)["input_ids"])
        needed = spec.steps * spec.micro_batch_size * spec.gradient_accumulation_steps * spec.sequence_length + 1
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join([text.strip()] * (needed // max(per_copy, 1) + 2)) + "\n")
        pack_file(corpus, tokenizer, spec.data_prefix, overwrite=True, progress=False)
    else:
        raise SystemExit(f"unknown data {data!r}: {', '.join(DATA_CHOICES)}")
    if spec.mode == "lora":
        spec.init_adapter = str(write_initial_adapter(spec, work / "init_adapter"))
    return spec


def write_initial_adapter(spec: TrainSpec, path: Path) -> Path:
    """The adapter at step 0 (A random, B zero), from lorafit's seeded init; PEFT loads the same file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.lora import apply_lora, reset_lora_parameters, save_adapter

    config = AutoConfig.from_pretrained(spec.model)
    with torch.device("meta"):  # the shapes are all that matter here; A and B are drawn from the seed below
        model = AutoModelForCausalLM.from_config(config)
    apply_lora(model, spec.r, spec.alpha, spec.targets)
    model.to_empty(device="cpu")
    reset_lora_parameters(model, seed=spec.seed)
    return save_adapter(model, path, overwrite=True)


def steady_tokens_per_s(result: dict, tokens_per_step: int) -> float:
    """Tokens/s over steps 2..N (N >= 2), from the step end times."""
    ends = result["step_end_s"]
    if len(ends) < 2:
        return tokens_per_step / ends[0]
    return (len(ends) - 1) * tokens_per_step / (ends[-1] - ends[0])


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """max |a - b| / |b| over steps; a step where both are 0 (no target token in its batch) differs by 0."""
    return max(abs(x - y) / abs(y) if y else (0.0 if x == y else math.inf) for x, y in zip(a, b, strict=True))


def allocator_env(tool: str, spec: TrainSpec) -> dict[str, str]:
    """Environment for a contender's process: LD_PRELOAD of tbbmalloc, or glibc's malloc."""
    import os

    from lorafit.allocator import ENV, preload_environment

    choice = spec.allocator or ("tbbmalloc" if tool == "lorafit" else "system")
    if choice == "system":
        return {ENV: "system"}
    env = preload_environment({k: v for k, v in os.environ.items() if k != ENV})
    if env is None:
        raise SystemExit("tbbmalloc is not available here (the `tbb` wheel, Linux x86-64)")
    return {"LD_PRELOAD": env["LD_PRELOAD"]}


def run_contenders(spec: TrainSpec, contenders: dict[str, tuple[str, dict]], reps: int, work: Path) -> dict:
    """{contender: [run result per repetition]}; each run in its own process, in alternating order."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for rep, name in alternating(list(contenders), reps):
        tool, overrides = contenders[name]
        contender_spec = TrainSpec(**{**spec.__dict__, **overrides})
        path = contender_spec.save(work / f"spec-{name}.json")
        env = allocator_env(tool, contender_spec)
        result = run_child(
            [str(BENCH_DIR / "_train_child.py"), tool, str(path), str(work / "result.json")],
            work / "result.json",
            work / f"log-{name}-{rep}.txt",
            env=env,
        )
        result["tokens_per_s"] = steady_tokens_per_s(result, spec.tokens_per_step)
        runs[name].append(result)
        print(
            f"  rep {rep + 1}/{reps} {name}: {fmt(result['tokens_per_s'])} tokens/s, "
            f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, final loss {result['losses'][-1]:.4f}",
            flush=True,
        )
    return runs
