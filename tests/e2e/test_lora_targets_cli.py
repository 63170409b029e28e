"""LoRA on the output head and on the embeddings through the real CLI: an untied head and the embeddings train;
a head tied to the embeddings is refused by `validate` (and so by `run`) with the reason."""

from __future__ import annotations

from pathlib import Path

import yaml

from cli_run import lorafit, lorafit_run, metrics
from tiny_runs import tiny_run_config


def write(tmp_path: Path, model_dir: Path, targets: tuple[str, ...]) -> Path:
    path = tmp_path / f"{'_'.join(targets)}.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(model_dir, cache_path=tmp_path / "lorem", targets=targets, steps=2)))
    return path


def adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_lora_on_an_untied_head_trains(tmp_path):
    from tiny import save_tiny_model_dir

    untied = save_tiny_model_dir(tmp_path / "untied", tie_word_embeddings=False)
    proc = lorafit_run(write(tmp_path, untied, ("q_proj", "lm_head")), tmp_path / "exp", "--experiment_id", "head")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    weights = adapter(tmp_path / "exp" / "head")
    head_b = weights["base_model.model.lm_head.lora_B.weight"]
    assert head_b.abs().sum() > 0  # B started at zero: the head's adapter got gradients and moved
    assert sorted(metrics(tmp_path / "exp" / "head")) == [1, 2]
    resolved = (tmp_path / "exp" / "head" / "config.resolved.yaml").read_text()
    assert "# memory allocator: tbbmalloc" in resolved  # the `lorafit` program's default, recorded in a comment
    assert "allocator" not in yaml.safe_load(resolved)["settings"]  # not a key: the config's program may refuse it


def test_lora_on_the_embeddings_trains(tmp_path, tiny_model_dir):
    proc = lorafit_run(write(tmp_path, tiny_model_dir, ("embed_tokens",)), tmp_path / "exp", "--experiment_id", "emb")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    weights = adapter(tmp_path / "exp" / "emb")
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].abs().sum() > 0  # A started at zero


def test_lora_on_a_tied_head_is_refused_by_validate(tmp_path, tiny_model_dir):
    proc = lorafit("validate", "--config_file_path", str(write(tmp_path, tiny_model_dir, ("q_proj", "lm_head"))))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.config.target_layers: lm_head shares its weight with the input embeddings" in proc.stderr
    assert "Traceback" not in proc.stderr
