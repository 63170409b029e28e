"""The training loop. Read it top to bottom: set-up, resume, the step, then what happens every N steps.

The loss of a step is the mean token cross-entropy over the GLOBAL batch (micro_batch_size x accumulation x
world_size samples). Each micro-batch's summed loss is divided by the number of target tokens of the whole
global batch (one all-reduce before the first backward), so one process and N processes compute the same
loss and the same gradients, whatever the padding or masking in each micro-batch.
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from lorafit.checkpoint import resume
from lorafit.checkpoint.state import checkpoint_dir, find_latest, save_checkpoint
from lorafit.checkpoint.trained_weights import write_trained_weights
from lorafit.config.run_spec import num_steps
from lorafit.console import info, warn
from lorafit.distributed.parallel import default_strategy
from lorafit.errors import UserError, describe_storage_error, storage_error
from lorafit.models.wrappers import full_tensor, unwrap
from lorafit.training.batches import default_collate, held_out_losses, to_device, train_micro_batches, train_sampler
from lorafit.training.checks import check_finite, check_gradient_flow
from lorafit.training.interrupt import StopRequest, TrainingInterrupted
from lorafit.training.job import TrainJob, TrainResult
from lorafit.training.loss import IGNORE_INDEX, CausalLMLoss
from lorafit.training.metrics import MetricsLogger, peak_memory_mb, plot_loss
from lorafit.training.swiglu import lean_mlps


def train(job: TrainJob) -> TrainResult:
    env, run_dir, settings = job.env, Path(job.run_dir), job.settings
    intervals, world = settings.intervals, env.world_size
    profile = settings.step_profile
    micro_batch, accum = profile.local_train_micro_batch_size, profile.gradient_accumulation_steps
    global_batch = micro_batch * accum * world
    total_steps = num_steps(settings, world, len(job.train_dataset))  # len: for an epoch target

    # --- set-up: wrap (checkpointing -> compile -> shard -> weights), then the optimizer over what was wrapped
    strategy = job.parallelism or default_strategy(env)
    strategy.plan(env, total_steps * micro_batch * accum * profile.sequence_length)  # auto precision, compile
    info(f"parallelism: {strategy.describe()} on {world} process(es), device {env.device}")
    # the step calls the loss module (decoder -> head -> cross-entropy), so it is what parallelism wraps
    loss_fn = strategy.wrap(CausalLMLoss(job.model, job.loss_chunk_tokens), env, job.fill_weights_after_sharding)
    loss_fn.train()
    model = unwrap(loss_fn)  # the Hugging Face model inside, as trained (parameters possibly sharded)
    optimizer = job.optimizer_factory(model)
    scheduler = job.scheduler_factory(optimizer, total_steps)
    sampler = train_sampler(len(job.train_dataset), settings, env.rank, world, job.shuffle, job.samples_per_epoch)
    _seed_everything(settings.seed + env.rank)  # differs per rank: dropout masks of different samples differ

    # --- resume (checkpoint/resume.py): the trainable parameters + optimizer moments, data position, counters, random
    #     states from the checkpoint; the optimizer and schedule hyper-parameters from this job
    step, tokens, elapsed = 0, 0, 0.0
    resumed = env.on_main(resume.resolve_checkpoint, run_dir, job.resume_from)  # checksums read once, by rank 0
    if resumed is not None:
        restored = resume.restore(resumed, run_dir, model, optimizer, scheduler, sampler, env)
        step, tokens, elapsed = restored.step, restored.tokens, restored.elapsed_s
    last_checkpoint = resumed
    steps_with_targets = step  # a resumed run's earlier steps count as having had targets

    metrics = MetricsLogger(
        run_dir,
        enabled=env.is_main,
        total_steps=total_steps,
        start_step=step,
        progress=job.progress,
        trackers=job.trackers,
    )
    collate = job.collate_fn or default_collate(job.train_dataset)
    batches = train_micro_batches(job.train_dataset, sampler, micro_batch, collate)
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses: list[tuple[int, float]] = []
    eval_losses: dict[str, float] = {}
    last_eval_step = last_ckpt_step = step
    start, window_start, window_tokens = time.perf_counter() - elapsed, time.perf_counter(), 0

    def run_eval() -> dict[str, float]:
        results = held_out_losses(
            loss_fn,
            job.eval_datasets,
            env,
            micro_batch,
            settings.eval_max_batches,
            lambda: strategy.autocast(env),
            job.collate_fn,
            job.eval_batch_sizes,
            job.eval_loss,
        )
        metrics.log({"step": step, **{f"eval/{k}/loss": v for k, v in results.items()}})
        return results

    def checkpoint() -> Path:
        trainer_state = {
            "tokens": tokens,
            "elapsed_s": time.perf_counter() - start,
            "sources": job.source_fingerprints,
            "global_batch_size": global_batch,
            "sampler": sampler.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        try:
            return save_checkpoint(
                run_dir, step, model, optimizer, trainer_state, env, settings.checkpointing.keep_last
            )
        except BaseException as error:  # BaseException: DCP's CheckpointException wraps a full disk as one
            raise _checkpoint_failure(error, checkpoint_dir(run_dir, step), last_checkpoint) from None

    per_micro_batch = job.loss_normalization == "micro_batch_mean"
    if job.eval_at_start and job.eval_datasets and resumed is None:  # the untrained model's held-out loss, step 0
        eval_losses = run_eval()
    interrupted = False
    try:
        with lean_mlps(model), StopRequest() as stop:
            while step < min(total_steps, job.stop_at_step or total_steps):
                # the whole global batch's target count first: every micro-batch loss is divided by it. A Ctrl-C
                # or SIGTERM on any rank rides along, so every rank stops before the same step (training/interrupt.py)
                micro = [to_device(next(batches), env.device) for _ in range(accum)]
                counts = torch.tensor(
                    [
                        sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
                        sum(_real_tokens(b) for b in micro),
                        float(stop.requested is not None),
                    ],
                    dtype=torch.float64,
                    device=env.device,
                )
                n_targets, n_tokens, stopping = env.all_reduce_sum(counts).tolist()
                if stopping:  # the sampler has not advanced: the checkpoint below resumes with these batches
                    interrupted = True
                    break
                if n_targets == 0:
                    warn(f"step {step + 1}: the global batch has no target token (all labels are -100)")
                # DDP and FSDP2 average gradients over ranks; x world turns that back into the global sum
                scale = world / max(n_targets, 1.0)
                loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
                for i, batch in enumerate(micro):
                    if per_micro_batch:  # each micro-batch's token mean / accumulation, ranks averaged
                        scale = 1.0 / (max(int((batch["labels"] != IGNORE_INDEX).sum()), 1) * accum)
                    with strategy.accumulating(loss_fn, sync=i == accum - 1):  # reduce once, on the last micro-batch
                        with strategy.autocast(env):
                            summed = loss_fn(**batch)  # summed token CE; every batch key is a model input
                        (summed * scale).backward()
                    loss_sum += summed.detach().double() * (scale if per_micro_batch else 1.0)
                total = float(env.all_reduce_sum(loss_sum))
                loss = total / world if per_micro_batch else total / max(n_targets, 1.0)
                grad_norm = _clip_grad_norm(trainable, settings.gradient_clipping)

                # stop before the optimizer touches the weights: the last good checkpoint stays the last one
                check_finite(loss, grad_norm, step + 1, str(last_checkpoint) if last_checkpoint else None)
                if n_targets > 0:  # a step without targets gives zero gradients by right: nothing to check
                    steps_with_targets += 1
                    if steps_with_targets <= 2:  # LoRA: B gets a gradient in the first such step, A from the second
                        check_gradient_flow(model, steps_with_targets, env)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                sampler.advance(global_batch)
                step += 1
                tokens += int(n_tokens)
                window_tokens += int(n_tokens)
                losses.append((step, loss))
                metrics.advance(step, loss)

                if step % intervals.training_log_interval_in_steps == 0 or step == total_steps:
                    now = time.perf_counter()
                    metrics.log(
                        {
                            "step": step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens": tokens,
                            "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                            **peak_memory_mb(env.device),
                            "elapsed_s": round(now - start, 3),
                        }
                    )
                    window_start, window_tokens = now, 0
                eval_every = intervals.evaluation_interval_in_steps  # None: at the end only
                if job.eval_datasets and eval_every and step % eval_every == 0:
                    eval_losses, last_eval_step = run_eval(), step
                checkpoint_every = intervals.checkpointing_interval_in_steps  # None: at the end only
                if checkpoint_every and step % checkpoint_every == 0:
                    last_checkpoint, last_ckpt_step = checkpoint(), step

            interrupted = interrupted or _stop_asked(stop, env)  # a signal in the last step counts too
            if last_ckpt_step != step:  # before the last evaluation: a second Ctrl-C there loses no training
                last_checkpoint = checkpoint()
            if job.eval_datasets and last_eval_step != step and not interrupted:
                eval_losses = run_eval()
            interrupted = interrupted or _stop_asked(stop, env)  # ... and one during that evaluation
    finally:
        metrics.close()
    if interrupted:
        if last_checkpoint and Path(run_dir) in Path(last_checkpoint).parents:
            saved = (
                f"checkpoint {last_checkpoint}. Continue with the same command plus --resume_from latest "
                f"--experiment_id {run_dir.name}"
            )
        elif last_checkpoint:  # a new run from another run's checkpoint, stopped before its own first one
            saved = f"nothing new was saved. Start again with --resume_from {last_checkpoint}"
        else:
            saved = f"no step was trained, so nothing was saved: start again (delete {run_dir} to reuse its id)"
        raise TrainingInterrupted(
            f"interrupted after step {step} of {total_steps}; {saved}", stop.requested or signal.SIGINT
        )

    # --- the results: adapter/ (LoRA) or model/ (full fine-tuning), gathered from the shards; the loss curve
    weights = write_trained_weights(
        model, env, run_dir, write=job.write_adapter, keep_full=job.gather_full_model, tokenizer=job.tokenizer
    )
    if env.is_main:
        plot_loss(run_dir)
    env.barrier()
    return TrainResult(
        model=model,
        run_dir=run_dir,
        env=env,
        steps=step,
        tokens=tokens,
        elapsed_s=time.perf_counter() - start,
        losses=losses,
        eval_losses=eval_losses,
        adapter_dir=weights.adapter_dir,
        model_dir=weights.model_dir,
        resumed_from=resumed,
        last_checkpoint=last_checkpoint,
        full_state_dict=weights.full_state_dict,
    )


def _stop_asked(stop: StopRequest, env) -> bool:
    """Whether any rank got SIGINT/SIGTERM (every rank calls: one all-reduce of a flag)."""
    flag = torch.tensor([float(stop.requested is not None)], dtype=torch.float64, device=env.device)
    return bool(env.all_reduce_sum(flag).item())


def _checkpoint_failure(error: BaseException, target: Path, last_complete: Path | None) -> BaseException:
    """A full disk (or a size limit) while saving `target`, said as what is true now; any other error as itself."""
    cause = storage_error(error)
    if cause is None:
        return error
    run_dir = target.parent.parent
    if last_complete is not None:
        kept = f"the last complete checkpoint, {last_complete}, is kept: make room, then add --resume_from latest"
    else:  # said plainly: --resume_from latest would find nothing
        kept = (
            f"no checkpoint of this run was completed, so there is nothing to resume: make room, then start "
            f"again (delete {run_dir} to reuse --experiment_id {run_dir.name})"
        )
    where = f"{target} ({cause.filename})" if cause.filename else target
    return UserError(describe_storage_error(cause, "saving a checkpoint", where) + f"; {kept}")


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global gradient norm (before clipping); clips when `max_norm` is set. DTensor norms are gathered."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
    return float(full_tensor(norm))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


__all__ = ["TrainJob", "TrainResult", "find_latest", "train"]
