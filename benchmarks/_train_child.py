"""Runs one contender of a training benchmark in this process: `python _train_child.py {lorafit|hf} SPEC RESULT`.

Writes RESULT (JSON): the loss of every step, the time at the end of every step (seconds since training
started), the seconds spent before training (imports, model load, set-up) and in the training call. Peak RSS is
measured by the parent (wait4 on this process).

  lorafit  lorafit's training engine (`lorafit.training.loop.train`), as `lorafit run` drives it
  hf       transformers.Trainer + peft, configured as its documentation recommends for CPU: `use_cpu=True`,
           `bf16=True` when the spec asks for bf16, the default fused AdamW, no evaluation, no saving, no
           reporting, the main process loading data (a memory-mapped file needs no workers), and the KV cache
           off during training
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import set_threads  # noqa: E402
from _train_job import TrainSpec  # noqa: E402


def set_mmap_threshold(nbytes: int) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD): blocks of at least `nbytes` get their own mapping, returned on free.

    Setting it also turns off glibc's dynamic threshold (the same as the MALLOC_MMAP_THRESHOLD_ variable).
    """
    import ctypes

    m_mmap_threshold = -3
    if ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, int(nbytes)) != 1:
        raise SystemExit(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_lorafit(spec: TrainSpec, run_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.config.run_spec import RunSettings
    from lorafit.datasets.packed import PackedDataset
    from lorafit.distributed.env import DistEnv
    from lorafit.distributed.parallel import ParallelismConfig, Strategy
    from lorafit.lora import apply_lora, load_adapter
    from lorafit.training.job import TrainJob
    from lorafit.training.loop import train
    from lorafit.training.optim import AdamWConfig, CosineConfig, OptimizerFactory, SchedulerFactory

    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    if spec.mode == "lora":
        from lorafit.lora.matching import nf4_skip_names

        # nf4_skip_layers naming the adapted layers (variant flags +nf4base+attnbf16): resolved on the plain model
        nf4_skipped = nf4_skip_names(model, spec.targets) if spec.nf4_skip_targets else set()
        apply_lora(model, spec.r, spec.alpha, spec.targets)
        if spec.init_adapter:
            load_adapter(model, spec.init_adapter)
        if spec.frozen_dtype:  # what model/lora's frozen_dtype does
            from lorafit.lora.component import store_frozen_base

            store_frozen_base(model, spec.frozen_dtype, nf4_skipped)
    strategy = Strategy(
        ParallelismConfig(
            mixed_precision=spec.precision, activation_checkpointing=spec.activation_checkpointing, compile=spec.compile
        )
    )
    job = TrainJob(
        model=model,
        train_dataset=PackedDataset(spec.data_prefix, spec.sequence_length),
        optimizer_factory=OptimizerFactory(AdamWConfig(lr=spec.lr, weight_decay=spec.weight_decay)),
        scheduler_factory=SchedulerFactory(CosineConfig(warmup_steps=0)),
        env=DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None),
        run_dir=run_dir,
        settings=RunSettings.model_validate(
            {
                "seed": spec.seed,
                "step_profile": {
                    "local_train_micro_batch_size": spec.micro_batch_size,
                    "gradient_accumulation_steps": spec.gradient_accumulation_steps,
                    "sequence_length": spec.sequence_length,
                },
                "training_target": {"num_target_steps": spec.steps},
                "gradient_clipping": spec.grad_clip,
            }
        ),
        parallelism=strategy,
        shuffle=False,
        loss_chunk_tokens=spec.loss_chunk_tokens,
        progress=False,
        write_adapter=spec.mode == "lora",
    )
    setup_s, setup_rss_mb = time.perf_counter() - PROCESS_START, peak_rss_mb()
    t = time.perf_counter()
    result = train(job)
    train_s = time.perf_counter() - t
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "losses": [loss for _, loss in result.losses],
        "step_end_s": [r["elapsed_s"] for r in steps],
        "train_peak_rss_mb": steps[-1]["peak_rss_mb"],
        "setup_s": setup_s,
        "setup_peak_rss_mb": setup_rss_mb,
        "train_s": train_s,
    }


def run_hf(spec: TrainSpec, run_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lorafit.datasets.packed import PackedDataset

    class Blocks(torch.utils.data.Dataset):
        """The same packed blocks; labels are already shifted, so they go in as `shift_labels` (no second shift).
        position_ids restart at each document, as lorafit's loss passes them: the model's packed-sequence path then
        keeps documents from attending to each other in both contenders (without them the two trained different
        tasks: losses 0.84 -> 0.67 here against 1.87 -> 1.09 in lorafit)."""

        def __init__(self, packed):
            self.packed = packed

        def __len__(self):
            return len(self.packed)

        def __getitem__(self, i):
            item = self.packed[i]
            return {
                "input_ids": item["input_ids"],
                "labels": item["labels"],
                "shift_labels": item["labels"],
                "position_ids": item["position_ids"],
            }

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.step_end, self.losses = 0.0, [], {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end.append(time.perf_counter() - self.start)
            self.peak_rss_mb = peak_rss_mb()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training
    if spec.mode != "lora":
        raise SystemExit("the hf contender runs LoRA jobs only")
    if spec.init_adapter:
        model = PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    else:
        config = LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, target_modules=spec.targets, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(run_dir),
        use_cpu=True,
        bf16=spec.precision == "bf16",
        per_device_train_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        max_steps=spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.grad_clip,
        train_sampling_strategy="sequential",
        gradient_checkpointing=spec.activation_checkpointing,
        torch_compile=spec.compile,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        seed=spec.seed,
    )
    clock = Clock()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Blocks(PackedDataset(spec.data_prefix, spec.sequence_length)),
        callbacks=[clock],
    )
    setup_s, setup_rss_mb = time.perf_counter() - PROCESS_START, peak_rss_mb()
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    losses = [clock.losses[s] for s in sorted(clock.losses)]
    return {
        "losses": losses,
        "step_end_s": clock.step_end,
        "train_peak_rss_mb": clock.peak_rss_mb,
        "setup_s": setup_s,
        "setup_peak_rss_mb": setup_rss_mb,
        "train_s": train_s,
        "optimizer": str(args.optim),
    }


def main() -> None:
    contender, spec_path, result_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = TrainSpec.load(spec_path)
    if spec.mmap_threshold is not None:  # before torch allocates anything
        set_mmap_threshold(spec.mmap_threshold)
    set_threads(spec.threads)
    import torch

    torch.manual_seed(spec.seed)
    with tempfile.TemporaryDirectory(prefix=f"lorafit-bench-{contender}-") as tmp:
        result = {"lorafit": run_lorafit, "hf": run_hf}[contender](spec, Path(tmp))
    result["torch_threads"] = torch.get_num_threads()
    from lorafit.allocator import active

    result["allocator"] = active()
    if len(result["losses"]) != spec.steps or len(result["step_end_s"]) != spec.steps:
        raise SystemExit(
            f"{contender}: {len(result['losses'])} losses / {len(result['step_end_s'])} step times "
            f"for {spec.steps} steps"
        )
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
