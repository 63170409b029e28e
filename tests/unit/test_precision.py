"""`mixed_precision: auto` and `compile: auto` (the defaults) pick what trains fastest on the hardware and for the
run's length, and say so; a slower pick is warned about. The CPU flags and GPU capability are injected."""

from __future__ import annotations

import pytest
import torch
import yaml

from lorafit.cli import main
from lorafit.distributed.parallel import ParallelismConfig
from lorafit.distributed.precision import cpu_flags, fastest_precision, resolve_precision
from lorafit.distributed.speed import MEASURED, compile_pays, plan_speed
from tiny_runs import evaluated_run_config

CPU = torch.device("cpu")
NO_AMX = frozenset({"avx2", "avx512f", "avx512_bf16"})  # the Xeon where bf16 measured 0.62x of fp32
AMX = NO_AMX | {"amx_tile", "amx_bf16"}


def test_fastest_precision_on_cpus_with_and_without_amx():
    assert fastest_precision(CPU, NO_AMX)[0] == "fp32"
    assert fastest_precision(CPU, AMX)[0] == "bf16"
    assert fastest_precision(CPU, frozenset())[0] == "fp32"


def test_fastest_precision_on_gpus_with_and_without_bf16():
    cuda = torch.device("cuda", 0)
    assert fastest_precision(cuda, cuda_bf16=("NVIDIA H100", True)) == ("bf16", "NVIDIA H100 computes in bf16 natively")
    assert fastest_precision(cuda, cuda_bf16=("Tesla V100", False)) == ("fp32", "Tesla V100 has no bf16 support")


def test_bf16_without_amx_warns_and_is_kept(capsys):
    assert resolve_precision("bf16", CPU, NO_AMX) == ("bf16", "as set")
    err = " ".join(capsys.readouterr().err.split())
    assert "mixed_precision: bf16 trains slower than fp32 here" in err and "auto" in err
    for asked, flags in (("bf16", AMX), ("fp32", NO_AMX), ("fp32", AMX)):
        assert resolve_precision(asked, CPU, flags) == (asked, "as set")
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("flags", "expected"), [(NO_AMX, "fp32"), (AMX, "bf16")])
def test_auto_says_what_it_picked(capsys, flags, expected):
    assert resolve_precision("auto", CPU, flags)[0] == expected
    assert f"mixed_precision auto: {expected} (" in capsys.readouterr().out


@pytest.mark.integration  # a whole `lorafit run`
def test_auto_through_lorafit_run_on_this_machine(tiny_model_dir, tmp_path, capsys):
    config = evaluated_run_config(tiny_model_dir, tmp_path, steps=2)
    del config["evaluators"]
    assert "parallelism" not in config  # the defaults: auto precision, auto compile
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--experiments-root-path", str(tmp_path / "e")]) == 0
    expected = "bf16" if "amx_bf16" in cpu_flags() else "fp32"  # this machine's CPU decides
    out = capsys.readouterr().out
    assert f"mixed_precision auto: {expected} (" in out
    assert f"parallelism: none (precision {expected}, activation checkpointing False, compile False)" in out
    assert "compile auto: off (" in out  # 2 steps of a tiny model: far below the measured break-even length


def test_defaults_are_auto():
    assert ParallelismConfig().mixed_precision == "auto" and ParallelismConfig().compile == "auto"


@pytest.mark.parametrize(("device", "precision"), sorted(MEASURED))
def test_compile_pays_only_past_the_measured_break_even_length(device, precision):
    need = MEASURED[device, precision].break_even_tokens
    assert 10_000 < need < 10_000_000  # seconds of compiling against a few percent per step
    assert compile_pays(device, precision, need - 1)[0] is False
    on, why = compile_pays(device, precision, need)
    assert on and f"{need:,}" in why and "measured on a" in why
    # monotone in the run's length
    assert [compile_pays(device, precision, n)[0] for n in (0, need // 2, need, 10 * need)] == [0, 0, 1, 1]


def test_compile_auto_is_off_where_nothing_was_measured_or_the_length_is_unknown():
    assert compile_pays("cuda", "bf16", 10**12) == (
        False,
        "no measurement of torch.compile on cuda in bf16 (set compile: true to compile)",
    )
    assert compile_pays("cpu", "fp32", None) == (False, "the run's length is not known")


def test_bf16_pays_more_for_compiling_than_fp32_on_the_measured_cpu():
    assert MEASURED["cpu", "bf16"].break_even_tokens < MEASURED["cpu", "fp32"].break_even_tokens


@pytest.mark.parametrize(
    ("flags", "tokens", "expected"),
    [
        (NO_AMX, 24_000, ("fp32", False)),
        (AMX, 24_000, ("bf16", False)),
        (NO_AMX, 10**7, ("fp32", True)),
        (AMX, 10**7, ("bf16", True)),
    ],
)
def test_plan_speed_defaults_per_machine_and_run_length(flags, tokens, expected, capsys):
    plan = plan_speed("auto", "auto", CPU, tokens, flags=flags)
    assert (plan.precision, plan.compile) == expected
    out = capsys.readouterr().out
    assert (
        f"mixed_precision auto: {expected[0]} (" in out and f"compile auto: {'on' if expected[1] else 'off'} (" in out
    )
    precision_line, compile_line = plan.lines()
    assert precision_line.startswith(f"precision: {expected[0]} (auto: ")
    assert compile_line.startswith(f"compile: {'on' if expected[1] else 'off'} (auto: {tokens:,} training tokens")


def test_plan_speed_keeps_what_the_config_sets(capsys):
    plan = plan_speed("fp32", True, CPU, 10, flags=AMX)
    assert (plan.precision, plan.compile, plan.compile_why) == ("fp32", True, "as set")
    plan = plan_speed("auto", False, torch.device("cuda", 0), 10**9, cuda_bf16=("NVIDIA H100", True), say=False)
    assert (plan.precision, plan.compile) == ("bf16", False)
    assert capsys.readouterr().out == ""
