"""Peak memory of a `lorafit run` process, predicted before the run: `lorafit validate` prints it and `lorafit run`
refuses early when it will not fit in the machine's memory.

The prediction is the larger of two phases, each a sum of parts (MiB):

    training    = runtime + allocator + frozen weights + adapters and optimizer + activations + head chunk
    evaluation  = runtime + allocator + frozen weights + adapters and optimizer + kept from training + generation

- runtime: the process after importing torch, transformers and lorafit (measured: 316 MiB).
- allocator: what loading a model, its tokenizer and running a first forward add beyond the weights themselves
  (library code, kernel caches, the allocator's own pools; measured: 170 MiB).
- frozen weights: every frozen parameter at its storage size (fp32 4 bytes, bf16 2, NF4 ~4.13 bits for the
  linear layers it quantises). A 4-bit base also loads torchao (measured: 86 MiB). Under FSDP2 on N processes:
  1/N of them, plus the gathered root (embeddings, final norm) whole beside its shard (FSDP2 keeps the shard and
  allocates the unsharded parameter; the root stays unsharded from forward to backward), plus two gathered decoder
  blocks (the one running, the next prefetched), each twice: the all-gather's flat output buffer and the
  parameters copied out of it (the freed buffer stays in the allocator's cache). Measured with
  fully_shard on 2 gloo ranks under tbbmalloc, a SmolLM2-sized root and block (2026-12-07, AMD EPYC
  avx512_bf16): unshard of the root +108 MiB (its whole size), of a block +27 MiB (twice its 13.5 MiB).
- adapters and optimizer: each trainable parameter's value, gradient, AdamW's two moments and the temporary of its
  update (sqrt of the second moment, one parameter at a time, but kept in the allocator's cache): 20 bytes (1/N
  of it under FSDP2). The temporary's 4 bytes are what full fine-tuning's measured peak asked for beyond 16.
- activations: what backward needs, per token and decoder layer, at micro batch x sequence length:
  ACT_HIDDEN x hidden + 2 x intermediate floats (the two saved SwiGLU intermediates), + intermediate where the
  down projection's input must be kept (an adapter on it, or full fine-tuning). With activation checkpointing:
  CKPT_HIDDEN x hidden per token and layer, plus one layer's activations being recomputed.
- head chunk: the fused head + cross-entropy's logits for up to 256 positions at a time (vocabulary floats each).
- generation: an evaluator's KV cache at batch x (prompt + new tokens), and its prefill's intermediates, times
  GENERATION_FACTOR (the cache's growth by concatenation; measured, see the constant). Measured and left out
  (benchmarks/memory_parts.py evaluation, the comparison task's evaluator, 2026-12-07): the unmerged adapters'
  branch outputs in the prefill (+6 MiB over the plain model) and the held-out loss pass before the generation
  (its memory is reused by the generation: the same peak).
- kept from training: what training and the evaluation before it leave in the allocator that the evaluation
  after training does not reuse (RSS before that evaluation minus the base parts above), as a fraction of the
  generation part (KEPT_FROM_TRAINING, measured on the main job). It did not follow the training step's shape
  (main job 119 MiB at 2 x 300 tokens, comparison task 158 at 2 x 128, 4-bit base with checkpointing 99, all
  three with 64-prompt evaluators); scaling it with the generation is an assumption, not measured.

ACT_HIDDEN and CKPT_HIDDEN and the two measured constants were fitted on one machine (AMD EPYC, 2 cores, torch 2.13
CPU, tbbmalloc) from SmolLM2-135M runs at three batch shapes with and without checkpointing; the generation factor
and the FSDP2 terms were measured part by part on the same CPU (2026-12-07); docs/benchmarks.md
("Peak memory predicted before the run") compares the prediction with measured peaks of the shipped configs.
bf16 autocast on CPU keeps a bf16 copy of each frozen weight it casts: counted, but not measured on a machine
where bf16 is the default (AMX). On a GPU the same parts predict the device memory without the runtime and
allocator parts: not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.config.run_spec import num_steps
from lorafit.distributed.env import DistEnv
from lorafit.distributed.parallel import decoder_blocks, default_strategy
from lorafit.distributed.speed import plan_speed
from lorafit.errors import UserError
from lorafit.evaluation.chat_scoring import _prompt_ids
from lorafit.frozen.linear import output_head
from lorafit.models.wrappers import unwrap

MIB = 2**20
RUNTIME_MIB = 316.0  # RSS after `import torch, transformers, lorafit.run.runner`, tbbmalloc
ALLOCATOR_MIB = 170.0  # RSS after loading SmolLM2-135M + tokenizer + one forward, minus runtime and the weights
ACT_HIDDEN = 8.0  # saved floats per token and layer, in units of hidden_size (fitted; besides 2 x intermediate)
CKPT_HIDDEN = 2.0  # with activation checkpointing: floats per token and layer kept, in units of hidden_size
# measured generation peak / (KV cache + prefill intermediates), over a process that had already run a forward (as
# after training): SmolLM2-135M fp32, tbbmalloc, 64 prompts x 65 tokens + 24 new, +454 MiB for 360 MiB of cache and
# prefill (2026-12-07, AMD EPYC avx512_bf16). The excess is the cache growing by concatenation: each step
# allocates every layer's K and V one token longer while the old copy lives, and the allocator keeps the freed ones.
# (1.12 before: measured from a freshly loaded model, where part of the increment is the allocator part's.)
GENERATION_FACTOR = 1.26
# RSS at the start of the evaluation after training minus runtime + allocator + weights + adapters and optimizer, over
# the generation part, on the main job (configs/smollm2_135m_lora.yaml, 10 steps: (1,153 - 1,034) / 470 MiB;
# benchmarks/memory_parts.py run_sequence, tbbmalloc, 2026-12-07, AMD EPYC avx512_bf16). Training and the
# evaluation before it leave it in tbbmalloc, in blocks the held-out loss pass and the generation after training do
# not reuse (an evaluation run twice before training reuses its own: +60 MiB, not +215, for the second loss pass).
KEPT_FROM_TRAINING = 0.25
OPTIMIZER_BYTES = 20  # per trainable parameter: value, gradient, two AdamW moments, the update's temporary
HEAD_CHUNK = 256  # positions per fused head + cross-entropy chunk (TrainJob.loss_chunk_tokens)
TORCHAO_MIB = 86.0  # RSS that importing torchao's NF4 adds (frozen_dtype: nf4)
NF4_BYTES = 4.127 / 8  # 4 bits + an int8 scale per 64 values + an fp32 scale per 256 scales


@dataclass(frozen=True)
class MemoryJob:
    """What the peak depends on: the model's shape and storage, the step's shape, and the evaluators'."""

    frozen_bytes: int  # every frozen parameter at its storage size, the whole model
    trainable: int  # trainable parameters
    root_bytes: int  # parameters outside the decoder blocks (embeddings, final norm, head)
    block_bytes: int  # one decoder block's parameters
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int  # key/value heads x head dim
    micro_batch: int
    sequence_length: int
    checkpointing: bool = False
    keeps_down_input: bool = False  # an adapter on the down projection, or full fine-tuning
    precision: str = "fp32"
    frozen_linear_bytes: int = 0  # the frozen linear weights in fp32 (what bf16 autocast caches a copy of)
    nf4: bool = False  # a 4-bit base (torchao loaded)
    world_size: int = 1
    sharded: bool = False  # fsdp2 over world_size processes
    device: str = "cpu"
    evaluations: tuple[tuple[int, int, int], ...] = ()  # (batch, prompt tokens, new tokens) per evaluator


@dataclass(frozen=True)
class MemoryPrediction:
    training: dict[str, float]  # MiB per part, in the order shown
    evaluation: dict[str, float]  # MiB per part (no evaluator: generation 0)
    device: str = "cpu"

    @property
    def phase(self) -> str:
        """Which phase sets the peak: "training" or "evaluation"."""
        return "evaluation" if sum(self.evaluation.values()) > sum(self.training.values()) else "training"

    @property
    def parts(self) -> dict[str, float]:
        return self.evaluation if self.phase == "evaluation" else self.training

    @property
    def total_mib(self) -> float:
        return sum(self.parts.values())

    def line(self) -> str:
        parts = ", ".join(f"{name} {value:,.0f}" for name, value in self.parts.items())
        what = "RSS" if self.device == "cpu" else f"{self.device} memory, not measured on a GPU"
        other = "evaluation" if self.phase == "training" else "training"
        other_mib = sum((self.evaluation if other == "evaluation" else self.training).values())
        return (
            f"predicted peak memory per process: {self.total_mib:,.0f} MiB ({what}; {parts}; set by "
            f"{self.phase}, {other} {other_mib:,.0f} MiB)"
        )


def predict(job: MemoryJob) -> MemoryPrediction:
    """The predicted peak and its parts (module docstring)."""
    f32 = 4
    n = job.world_size if job.sharded else 1
    weights = job.frozen_bytes / n
    if job.sharded and n > 1:  # the gathered root beside its shard; two gathered blocks, buffer + copy each
        weights += job.root_bytes + 2 * 2 * job.block_bytes
    state = OPTIMIZER_BYTES * job.trainable / n
    tokens = job.micro_batch * job.sequence_length
    per_layer = ACT_HIDDEN * job.hidden + 2 * job.intermediate + (job.intermediate if job.keeps_down_input else 0)
    if job.checkpointing:
        activations = tokens * (job.layers * CKPT_HIDDEN * job.hidden + per_layer) * f32
    else:
        activations = tokens * job.layers * per_layer * f32
    head = min(HEAD_CHUNK, tokens) * job.vocab * f32
    autocast_copies = job.frozen_linear_bytes / 2 / n if job.precision == "bf16" and job.device == "cpu" else 0.0
    generation = 0.0
    for batch, prompt, new in job.evaluations:
        kv = batch * (prompt + new) * job.layers * 2 * job.kv_width * f32
        prefill = batch * prompt * (3 * job.intermediate + 4 * job.hidden) * f32
        generation = max(generation, GENERATION_FACTOR * (kv + prefill))
    fixed = {"runtime": RUNTIME_MIB, "allocator": ALLOCATOR_MIB} if job.device == "cpu" else {}
    common = {**fixed, "weights": weights / MIB, "adapters+optimizer": state / MIB}
    if job.nf4:
        common["torchao"] = TORCHAO_MIB
    if autocast_copies:
        common["bf16 weight copies"] = autocast_copies / MIB
    training = {
        **common,
        "activations" + (" (checkpointed)" if job.checkpointing else ""): activations / MIB,
        "head": head / MIB,
    }
    kept = {"kept from training": KEPT_FROM_TRAINING * generation / MIB} if job.device == "cpu" else {}
    evaluation = {**common, **(kept if generation else {}), "generation": generation / MIB}
    return MemoryPrediction(training, evaluation, job.device)


def available_mib() -> float | None:
    """The memory this machine can still give a process (MemAvailable), or None where unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return None


def check_fits(prediction: MemoryPrediction, processes_here: int = 1, available: float | None = None) -> None:
    """Raise a UserError with the numbers when `processes_here` such processes will not fit in this machine's
    available memory (CPU only: on a GPU the prediction is not measured)."""

    if prediction.device != "cpu":
        return
    available = available_mib() if available is None else available
    need = prediction.total_mib * processes_here
    if available is not None and need > available:
        many = f" x {processes_here} processes" if processes_here > 1 else ""
        raise UserError(
            f"this run will not fit in memory: {prediction.line()}{many} = {need:,.0f} MiB, but the machine has "
            f"{available:,.0f} MiB available. Lower settings.step_profile.local_train_micro_batch_size or "
            "sequence_length, an evaluator's batch_size, turn on activation_checkpointing (parallelism), or store "
            "the frozen base in a lower precision (model/lora frozen_dtype); LORAFIT_SKIP_MEMORY_CHECK=1 runs anyway"
        )


# --- from a built run ----------------------------------------------------------------------------------------------
def job_from_run(run, config: dict, world_size: int = 1, precision: str = "fp32") -> MemoryJob | str:
    """The MemoryJob of a built run (its model may be on the meta device) and its resolved `config`, or why
    there is none (a model whose shape this module does not know)."""
    import torch

    model = unwrap(run.model)
    shape = getattr(model, "config", None)
    hidden = getattr(shape, "hidden_size", None)
    intermediate = getattr(shape, "intermediate_size", None)
    layers = getattr(shape, "num_hidden_layers", None)
    vocab = getattr(shape, "vocab_size", None)
    heads = getattr(shape, "num_attention_heads", None)
    if not all(isinstance(v, int) for v in (hidden, intermediate, layers, vocab, heads)):
        return f"{type(model).__name__}'s config names no hidden_size/intermediate_size/num_hidden_layers/vocab_size"
    head_dim = getattr(shape, "head_dim", None) or hidden // heads
    kv_heads = getattr(shape, "num_key_value_heads", None) or heads
    frozen_dtype, skip = _frozen_storage(config)
    head = output_head(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    frozen = frozen_linear = trainable = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied: counted once
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
                continue
            size = p.numel() * p.element_size()
            linear = isinstance(module, torch.nn.Linear) and pname == "weight" and id(p) not in head_ids
            if linear:
                frozen_linear += p.numel() * 4
                if frozen_dtype == "nf4" and p.numel() % 64 == 0:
                    kept = any(name.endswith(s) or f".{s}." in f"{name}." for s in skip)
                    size = p.numel() * (2 if kept else NF4_BYTES)
                elif frozen_dtype == "bfloat16":
                    size = p.numel() * 2
            frozen += int(size)
    blocks = decoder_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters()) if blocks else 0
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    strategy = run.parallelism
    if strategy is None:
        fake = DistEnv(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"), backend=None)
        strategy = default_strategy(fake)
    sp = run.settings.step_profile
    full = trainable and not any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    down = full or any(
        p.requires_grad and "lora_" in n and ("down_proj" in n or "mlp.c_proj" in n)
        for n, p in model.named_parameters()
    )
    return MemoryJob(
        frozen_bytes=frozen,
        trainable=trainable,
        root_bytes=root_bytes,
        block_bytes=block_bytes,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        vocab=vocab,
        kv_width=kv_heads * head_dim,
        micro_batch=sp.local_train_micro_batch_size,
        sequence_length=sp.sequence_length,
        checkpointing=strategy.config.activation_checkpointing,
        keeps_down_input=bool(down),
        precision=precision,
        frozen_linear_bytes=frozen_linear,
        nf4=frozen_dtype == "nf4",
        world_size=world_size,
        sharded=strategy.name == "fsdp2",
        device="cuda" if torch.cuda.is_available() else "cpu",
        evaluations=_evaluations(run),
    )


def _frozen_storage(config: dict) -> tuple[str | None, list[str]]:
    """`frozen_dtype` and `nf4_skip_layers` of the config's model/lora component (the meta-device build does
    not quantise, so the config says what the run will store)."""

    def walk(node):
        if isinstance(node, dict):
            if node.get("component_key") == "model" and node.get("variant_key") == "lora":
                yield node.get("config") or {}
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    for lora in walk(config):
        if lora.get("frozen_dtype"):
            return lora["frozen_dtype"], [str(s) for s in lora.get("nf4_skip_layers") or []]
    return None, []


def _evaluations(run) -> tuple[tuple[int, int, int], ...]:
    """(batch, longest prompt in tokens, new tokens) per exact-match evaluator."""
    out = []
    for evaluator in run.evaluators or []:
        config, examples = getattr(evaluator, "config", None), getattr(evaluator, "examples", None)
        if config is None or not examples:
            continue
        prompt = 0
        if run.tokenizer is not None:
            prompt = max(len(_prompt_ids(run.tokenizer, ex)) for ex in examples)
        else:  # ~4 characters a token, and a chat template's framing
            prompt = max(sum(len(m["content"]) for m in ex.prompt) for ex in examples) // 4 + 40
        out.append((min(config.batch_size, len(examples)), prompt, config.max_new_tokens))
    return tuple(out)


def describe(run, config: dict, world_size: int = 1) -> list[str]:
    """`lorafit validate`'s lines: what precision and compile the defaults pick here and why, and the predicted
    peak memory per process."""
    import torch

    sp = run.settings.step_profile
    try:  # an epoch target counts samples: known only once the data is tokenized (validate tokenizes nothing)
        epochs = run.settings.training_target.num_target_epochs is not None
        steps = num_steps(run.settings, world_size, len(run.train_dataset) if epochs else None)
    except (ValueError, TypeError, OSError, RuntimeError, UserError):
        steps = None
    tokens = None
    if steps is not None:
        tokens = steps * sp.local_train_micro_batch_size * sp.gradient_accumulation_steps * sp.sequence_length
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    env = DistEnv(rank=0, local_rank=0, world_size=world_size, device=device, backend=None)
    strategy = run.parallelism or default_strategy(env)
    plan = plan_speed(strategy.config.mixed_precision, strategy.config.compile, device, tokens, say=False)
    lines = plan.lines()
    job = job_from_run(run, config, world_size, plan.precision)
    if isinstance(job, str):
        return [*lines, f"predicted peak memory: not predicted ({job})"]
    prediction = predict(job)
    lines.append(prediction.line() + (f" on each of {world_size} processes" if world_size > 1 else ""))
    available = available_mib()
    if available is not None and prediction.device == "cpu":
        need = prediction.total_mib * world_size
        verdict = "fits" if need <= available else "DOES NOT FIT"
        lines.append(
            f"memory available here: {available:,.0f} MiB ({verdict}: {need:,.0f} MiB for {world_size} process(es))"
        )
    return lines


def refuse_if_too_big(run, config: dict, env) -> None:
    """`lorafit run`, before anything heavy: a UserError with the numbers when the predicted peak of this
    machine's processes exceeds the memory it has (what this process already holds counted as available).
    LORAFIT_SKIP_MEMORY_CHECK=1 skips it, for a machine where the prediction is off."""
    import os

    if os.environ.get("LORAFIT_SKIP_MEMORY_CHECK") or env.device.type != "cpu":
        return
    strategy = run.parallelism or default_strategy(env)
    precision = plan_speed(strategy.config.mixed_precision, False, env.device, None, say=False).precision
    job = job_from_run(run, config, env.world_size, precision)
    available = available_mib()
    if isinstance(job, str) or available is None:
        return
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_fits(predict(job), here, available + _current_rss_mib() * here)  # what each already holds is theirs


def _current_rss_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return int(status.split("VmRSS:")[1].split()[0]) / 1024 if "VmRSS:" in status else 0.0
