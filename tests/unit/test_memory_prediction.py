"""The peak memory predicted before a run (training/memory.py): its parts, how they move with the job, what
`lorafit validate` prints, and the early refusal when a run will not fit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from lorafit.cli import main
from lorafit.errors import UserError
from lorafit.training.memory import KEPT_FROM_TRAINING, MIB, MemoryJob, check_fits, predict
from tiny_runs import evaluated_run_config

# SmolLM2-135M's shape, LoRA r=16 on q,k,v,o: the main job (configs/smollm2_135m_lora.yaml)
MAIN_JOB = MemoryJob(
    frozen_bytes=134_514_816 * 4,
    trainable=1_843_200,
    root_bytes=28_311_552 * 4 + 576 * 4,
    block_bytes=3_540_096 * 4,
    layers=30,
    hidden=576,
    intermediate=1536,
    vocab=49152,
    kv_width=192,
    micro_batch=2,
    sequence_length=300,
    evaluations=((64, 63, 32),),
)


# its training alone (with the evaluator, the evaluation after training sets the peak, by 14 MiB)
TRAINING_ONLY = replace(MAIN_JOB, evaluations=())


def test_parts_are_what_the_job_holds():
    p = predict(TRAINING_ONLY)
    assert p.phase == "training"
    assert list(p.parts) == ["runtime", "allocator", "weights", "adapters+optimizer", "activations", "head"]
    assert p.parts["weights"] == pytest.approx(134_514_816 * 4 / MIB)
    # value, gradient, two moments, the update's temporary
    assert p.parts["adapters+optimizer"] == pytest.approx(1_843_200 * 20 / MIB)
    assert p.total_mib == pytest.approx(sum(p.parts.values()))
    line = p.line()
    assert line.startswith(f"predicted peak memory per process: {p.total_mib:,.0f} MiB (RSS; runtime 316, ")
    assert "set by training, evaluation " in line


def test_more_tokens_more_memory_and_checkpointing_less():
    base = predict(TRAINING_ONLY).total_mib
    assert predict(replace(TRAINING_ONLY, micro_batch=4)).total_mib > base
    assert predict(replace(TRAINING_ONLY, sequence_length=600)).total_mib > base
    assert predict(replace(TRAINING_ONLY, sequence_length=150)).total_mib < base
    checkpointed = predict(replace(TRAINING_ONLY, checkpointing=True))
    assert "activations (checkpointed)" in checkpointed.parts and checkpointed.total_mib < base
    # activations grow linearly in tokens (no sequence-squared term: the attention kernels do not keep scores)
    a = [predict(replace(MAIN_JOB, micro_batch=b)).training["activations"] for b in (1, 2, 4)]
    assert a[2] - a[1] == pytest.approx(2 * (a[1] - a[0]))


def test_low_precision_base_and_sharding_shrink_the_weights():
    base = predict(MAIN_JOB).parts["weights"]
    assert predict(replace(MAIN_JOB, frozen_bytes=MAIN_JOB.frozen_bytes // 2)).parts["weights"] == pytest.approx(
        base / 2
    )
    assert predict(replace(MAIN_JOB, nf4=True)).parts["torchao"] == 86.0  # the 4-bit base's library
    sharded = predict(replace(MAIN_JOB, world_size=2, sharded=True)).parts
    assert base / 2 < sharded["weights"] < base  # half, plus the gathered root and two blocks
    # the root gathered whole beside its shard; two blocks, each as the all-gather buffer and the copied parameters
    gathered = MAIN_JOB.root_bytes + 4 * MAIN_JOB.block_bytes
    assert sharded["weights"] == pytest.approx((MAIN_JOB.frozen_bytes / 2 + gathered) / MIB)
    assert sharded["adapters+optimizer"] == pytest.approx(predict(MAIN_JOB).parts["adapters+optimizer"] / 2)
    replicated = predict(replace(MAIN_JOB, world_size=2, sharded=False)).parts  # ddp: every process holds it all
    assert replicated["weights"] == pytest.approx(base)


def test_full_fine_tuning_pays_for_every_parameter():
    full = replace(MAIN_JOB, frozen_bytes=0, trainable=136_358_208, keeps_down_input=True)
    p = predict(full)
    assert p.parts["adapters+optimizer"] == pytest.approx(136_358_208 * 20 / MIB)
    assert p.training["activations"] > predict(MAIN_JOB).training["activations"]


def test_a_large_evaluation_batch_sets_the_peak():
    p = predict(replace(MAIN_JOB, micro_batch=1, sequence_length=64, evaluations=((512, 200, 64),)))
    assert p.phase == "evaluation" and "generation" in p.parts and "activations" not in p.parts


def test_the_evaluation_after_training_counts_what_training_left_in_the_allocator():
    # the comparison task's evaluator: 64 prompts of up to 65 tokens, 24 new (configs/smollm2_135m_hard_lora.yaml)
    hard = replace(MAIN_JOB, sequence_length=128, trainable=921_600, evaluations=((64, 65, 24),))
    p = predict(hard)
    assert p.phase == "evaluation"
    parts = ["runtime", "allocator", "weights", "adapters+optimizer", "kept from training", "generation"]
    assert list(p.parts) == parts
    kv = 64 * (65 + 24) * 30 * 2 * 192 * 4  # batch x (prompt + new) x layers x K and V x kv width x fp32
    prefill = 64 * 65 * (3 * 1536 + 4 * 576) * 4
    assert p.parts["generation"] == pytest.approx(1.26 * (kv + prefill) / MIB)
    assert p.parts["kept from training"] == pytest.approx(KEPT_FROM_TRAINING * p.parts["generation"])
    # both grow with the evaluator's batch
    bigger = predict(replace(hard, evaluations=((128, 65, 24),))).parts
    assert bigger["generation"] == pytest.approx(2 * p.parts["generation"])
    assert bigger["kept from training"] == pytest.approx(2 * p.parts["kept from training"])
    # no evaluator: nothing runs after training, so nothing is counted for it
    assert "kept from training" not in predict(replace(hard, evaluations=())).evaluation
    assert "kept from training" not in predict(replace(hard, device="cuda")).evaluation  # RSS only


def test_bf16_autocast_on_cpu_counts_the_cast_copies():
    p = predict(replace(MAIN_JOB, precision="bf16", frozen_linear_bytes=106_168_320 * 4))
    assert p.parts["bf16 weight copies"] == pytest.approx(106_168_320 * 2 / MIB)


def test_refuses_with_the_numbers_when_it_will_not_fit():
    p = predict(MAIN_JOB)
    check_fits(p, 1, available=p.total_mib + 1)
    with pytest.raises(UserError) as e:
        check_fits(p, 2, available=p.total_mib * 1.5)
    message = str(e.value)
    assert (
        f"x 2 processes = {2 * p.total_mib:,.0f} MiB" in message
        and f"{p.total_mib * 1.5:,.0f} MiB available" in message
    )
    assert "local_train_micro_batch_size" in message and "activation_checkpointing" in message


def test_validate_prints_the_choices_and_the_prediction(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(evaluated_run_config(tiny_model_dir, tmp_path)))
    assert main(["validate", "--config", str(path)]) == 0
    assert main(["validate", "--config", str(path), "--nproc_per_node", "2"]) == 0
    out = capsys.readouterr().out
    assert "precision: " in out and "compile: off (auto: " in out
    one, two = [line for line in out.splitlines() if line.startswith("predicted peak memory per process: ")]
    assert "weights " in one and "adapters+optimizer " in one and "activations " in one
    assert two.endswith("on each of 2 processes")  # fsdp2 by default under torchrun: each holds half the weights
    assert "memory available here: " in out


@pytest.mark.integration  # a whole `lorafit run`
def test_run_refuses_early_when_the_machine_is_too_small(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorafit.training.memory.available_mib", lambda: 1.0)
    monkeypatch.setattr("lorafit.training.memory._current_rss_mib", lambda: 0.0)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(evaluated_run_config(tiny_model_dir, tmp_path)))
    assert main(["run", "--config", str(path), "--experiments_root_path", str(tmp_path / "e")]) == 2
    assert "this run will not fit in memory: predicted peak memory per process" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())  # no run folder left behind
    monkeypatch.setenv("LORAFIT_SKIP_MEMORY_CHECK", "1")
    assert main(["run", "--config", str(path), "--experiments_root_path", str(tmp_path / "e")]) == 0
