"""`mixed_precision: auto` picks what trains fastest on the hardware and says so; a slower pick is warned about."""

from __future__ import annotations

import pytest
import torch
import yaml

from lorafit.cli import main
from lorafit.distributed.precision import cpu_flags, fastest_precision, resolve_precision
from tiny_runs import evaluated_run_config

CPU = torch.device("cpu")
NO_AMX = frozenset({"avx2", "avx512f", "avx512_bf16"})  # the Xeon where bf16 measured 0.62x of fp32
AMX = NO_AMX | {"amx_tile", "amx_bf16"}


def test_fastest_precision_on_cpus_with_and_without_amx():
    assert fastest_precision(CPU, NO_AMX)[0] == "fp32"
    assert fastest_precision(CPU, AMX)[0] == "bf16"
    assert fastest_precision(CPU, frozenset())[0] == "fp32"


def test_bf16_without_amx_warns_and_is_kept(capsys):
    assert resolve_precision("bf16", CPU, NO_AMX) == "bf16"
    err = " ".join(capsys.readouterr().err.split())
    assert "mixed_precision: bf16 trains slower than fp32 here" in err and "auto" in err
    for asked, flags in (("bf16", AMX), ("fp32", NO_AMX), ("fp32", AMX)):
        assert resolve_precision(asked, CPU, flags) == asked
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("flags", "expected"), [(NO_AMX, "fp32"), (AMX, "bf16")])
def test_auto_says_what_it_picked(capsys, flags, expected):
    assert resolve_precision("auto", CPU, flags) == expected
    assert f"mixed_precision auto: {expected} (" in capsys.readouterr().out


def test_auto_through_lorafit_run_on_this_machine(tiny_model_dir, tmp_path, capsys):
    config = evaluated_run_config(tiny_model_dir, tmp_path, steps=2)
    del config["evaluators"]
    config["parallelism"] = {"component_key": "parallelism", "variant_key": "none",
                             "config": {"mixed_precision": "auto"}}  # fmt: skip
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--experiments-root-path", str(tmp_path / "e")]) == 0
    expected = "bf16" if "amx_bf16" in cpu_flags() else "fp32"  # this machine's CPU decides
    out = capsys.readouterr().out
    assert f"mixed_precision auto: {expected} (" in out
    assert "parallelism: none (precision auto" in out
