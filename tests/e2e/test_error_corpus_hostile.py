"""A second, hostile pass (issue 12): inputs that once lost user data, hung, or ended in a traceback.

Each test goes through the real CLI (`lorafit.cli.main` in-process, or `python -m lorafit` in a subprocess with a
timeout where a hang, a signal or the process environment is the point) and checks the promise of
docs/troubleshooting.md: exit code 2, one `error:` line naming the YAML path, argument or file, no traceback,
and every file the user had byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tiny_runs
from cli_run import lorafit
from lorafit.cli import main
from tiny_runs import LOREM


# ------------------------------------------------------------------------------------------------ helpers
def smallest_run_config(model_dir: Path, train_path: Path, cache_path: Path, *, steps: int = 1) -> dict:
    """The smallest complete run: LoRA on the tiny Llama, one step, the raw text file cached at `cache_path`."""
    every = {
        "training_log_interval_in_steps": 1,
        "checkpointing_interval_in_steps": steps,
        "evaluation_interval_in_steps": steps,
    }
    return tiny_runs.tiny_run_config(
        model_dir,
        data=train_path,
        cache_path=cache_path,
        seed=1,
        micro=1,
        accum=1,
        sequence_length=16,
        steps=steps,
        intervals=every,
        r=2,
        alpha=4,
        targets=("q_proj",),
        lr=1e-3,
        scheduler="constant",
    )


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> the sha256 of its bytes ('<dir>' for folders)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """`lorafit ARGV` in-process: (exit code, stderr)."""
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def lorafit_process(argv: list[str], *, timeout: float = 120, env: dict | None = None, cwd: Path | None = None):
    """`python -m lorafit ARGV` in a subprocess (a hang fails the test through the timeout)."""
    return lorafit(*argv, timeout=timeout, env=env, cwd=cwd)


def assert_one_error(code: int, err: str, *fragments: str, exit_code: int = 2) -> str:
    """Exit code 2, no traceback, exactly one `error:` line holding every fragment; returns the message."""
    assert code == exit_code, f"exit code {code}\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    message = err[err.index("error:") :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def assert_unchanged(before: dict[str, str], after: dict[str, str], *, may_add: tuple[str, ...] = ()) -> None:
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"changed or removed: {changed}"
    added = sorted(k for k in set(after) - set(before) if not k.startswith(may_add))
    assert not added, f"added: {added}"


# ------------------------------------------------------------------------ 1. the dataset cache and user files
USER_BIN = b"\x00\x01my own tokens, not lorafit's\xff" * 10
USER_JSON = b'{"mine": true, "notes": "hand-written"}\n'


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cache_path_onto_the_users_own_files_is_refused(command, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "corpus.bin").write_bytes(USER_BIN)
    (tmp_path / "corpus.json").write_bytes(USER_JSON)
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "corpus"))
    before = snapshot(tmp_path)
    argv = [command, "--config_file_path", str(config)]
    if command == "run":
        argv += ["--experiments_root_path", str(tmp_path / "exp"), "--experiment_id", "x"]
    code, err = cli(argv, capsys)
    assert_one_error(
        code,
        err,
        "train_dataset.config.cache_path:",
        "corpus.bin, corpus.json",
        "lorafit did not write them",
        "choose another cache_path",
    )
    assert_unchanged(before, snapshot(tmp_path), may_add=("exp",))


def test_cache_path_onto_another_files_pack_output_is_refused(tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "other.txt"
    other.write_text("Another document.\n\nAnd a second one, a little longer than the first.\n")
    pack = [
        "data",
        "pack",
        "--input",
        str(other),
        "--tokenizer",
        str(tiny_model_dir),
        "--output",
        str(tmp_path / "packed"),
        "--no_progress",
    ]
    assert cli(pack, capsys)[0] == 0
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "packed"))
    before = snapshot(tmp_path)
    run = [
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(tmp_path / "exp"),
        "--experiment_id",
        "x",
    ]
    code, err = cli(run, capsys)
    assert_one_error(code, err, "train_dataset.config.cache_path:", "a `lorafit data pack` output of", "other.txt")
    assert_unchanged(before, snapshot(tmp_path), may_add=("exp",))


def test_cache_replaces_only_its_own_files_for_the_same_source(tmp_path, tiny_model_dir, capsys):
    """The cache of a.txt is repacked when a.txt changes, but a second file pointed at it is refused."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(LOREM.read_text())
    b.write_text(LOREM.read_text())
    run_a = write_yaml(tmp_path / "a.yaml", smallest_run_config(tiny_model_dir, a, tmp_path / "cache" / "c"))
    argv = ["run", "--config_file_path", str(run_a), "--experiments_root_path", str(tmp_path / "exp")]
    assert cli([*argv, "--experiment_id", "a1"], capsys)[0] == 0
    first = (tmp_path / "cache" / "c.bin").read_bytes()
    a.write_text(LOREM.read_text() + "\n\nOne more paragraph at the end.\n")
    assert cli([*argv, "--experiment_id", "a2"], capsys)[0] == 0  # its own, stale: repacked
    assert (tmp_path / "cache" / "c.bin").read_bytes() != first

    run_b = write_yaml(tmp_path / "b.yaml", smallest_run_config(tiny_model_dir, b, tmp_path / "cache" / "c"))
    before = snapshot(tmp_path / "cache")
    code, err = cli(["validate", "--config_file_path", str(run_b)], capsys)
    assert_one_error(code, err, "train_dataset.config.cache_path:", "the cache of another file", str(a.resolve()))
    assert_unchanged(before, snapshot(tmp_path / "cache"))


def test_data_pack_never_replaces_what_is_not_a_pack_output(tmp_path, tiny_model_dir, capsys):
    source = tmp_path / "train.txt"
    source.write_text("A first document.\n\nA second document.\n")
    (tmp_path / "corpus.bin").write_bytes(USER_BIN)
    (tmp_path / "corpus.json").write_bytes(USER_JSON)
    pack = ["data", "pack", "--input", str(source), "--tokenizer", str(tiny_model_dir), "--no_progress", "--output"]
    before = snapshot(tmp_path)
    code, err = cli([*pack, str(tmp_path / "corpus"), "--overwrite"], capsys)
    assert_one_error(
        code,
        err,
        "--output",
        "corpus.bin, ",
        "corpus.json exist and are not an earlier `lorafit data pack` output",
        "choose another --output",
    )
    assert_unchanged(before, snapshot(tmp_path))

    # onto another pack's output: refused without --overwrite, replaced with it
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.\n")
    assert (
        cli(
            [
                "data",
                "pack",
                "--input",
                str(other),
                "--tokenizer",
                str(tiny_model_dir),
                "--no_progress",
                "--output",
                str(tmp_path / "packed"),
            ],
            capsys,
        )[0]
        == 0
    )
    before = snapshot(tmp_path)
    code, err = cli([*pack, str(tmp_path / "packed")], capsys)
    assert_one_error(code, err, "packed.bin already exists; pass --overwrite")
    assert_unchanged(before, snapshot(tmp_path))
    assert cli([*pack, str(tmp_path / "packed"), "--overwrite"], capsys)[0] == 0
    assert snapshot(tmp_path)["packed.bin"] != before["packed.bin"]


# ------------------------------------------------------------------------------- 10. untrusted adapter_config.json
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A rank-2 adapter on q_proj and v_proj of the tiny model, saved by lorafit (PEFT format)."""
    from transformers import AutoModelForCausalLM

    from lorafit.lora import apply_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_lora(model, r=2, alpha=4, target_layers=["q_proj", "v_proj"], seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


def _edited_adapter(tmp_path: Path, tiny_adapter: Path, **changes) -> Path:
    import json
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        (
            {"r": 1_000_000_000},
            ("adapter_model.safetensors", "no LoRA tensor has rank r = 1000000000 (adapter_config.json)"),
        ),
        (
            {"target_modules": ["../../etc", 42]},
            ("adapter_config.json: target_modules: items must be module names", "'../../etc', 42"),
        ),
        ({"lora_alpha": float("nan")}, ("adapter_config.json: lora_alpha: must be a finite number, got nan",)),
        ({"lora_dropout": "lots"}, ("adapter_config.json: lora_dropout: must be a number in [0, 1)",)),
    ],
    ids=["huge_r", "target_modules_types", "alpha_nan", "dropout_type"],
)
def test_untrusted_adapter_config_is_checked_before_anything_is_allocated(
    changes, fragments, tmp_path, tiny_model_dir, tiny_adapter, capsys
):
    import resource

    adapter = _edited_adapter(tmp_path, tiny_adapter, **changes)
    before = snapshot(tmp_path)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(adapter),
        "--prompt",
        "hi",
        "--max_new_tokens",
        "1",
    ]
    code, err = cli(argv, capsys)
    assert_one_error(code, err, *fragments)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KiB: nothing huge
    assert_unchanged(before, snapshot(tmp_path))


# ----------------------------------------------------------- 8, 12, 14. hostile YAML: aliases, depth, duplicate keys
def _valid_config_text(tmp_path: Path, model_dir: Path) -> str:
    return yaml.safe_dump(smallest_run_config(model_dir, LOREM, tmp_path / "cache" / "lorem"), sort_keys=False)


def test_alias_bomb_is_refused_at_once_even_under_an_unknown_key(tmp_path, tiny_model_dir):
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "not_a_known_key:\n" + "".join(f"  {line}\n" for line in levels)
    config = tmp_path / "config.yaml"
    config.write_text(_valid_config_text(tmp_path, tiny_model_dir) + bomb)
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = lorafit_process(["validate", "--config_file_path", str(config)], timeout=60)
    assert time.monotonic() - started < 30
    assert_one_error(
        result.returncode, result.stderr, "config.yaml: line", "expands to more than 100,000 values", "through aliases"
    )
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("style", ["flow", "block", "aliases"])
def test_config_nested_5000_levels_deep_is_one_clear_error(style, tmp_path, tiny_model_dir, capsys):
    n = 5000
    if style == "flow":
        deep = "note: " + "[" * n + "]" * n + "\n"
    elif style == "block":
        deep = "note:\n  " + "- " * n + "1\n"  # block style: 5,000 nested one-item lists on one line
    else:  # a chain of anchors, each one list deeper than the last: shallow text, deep once expanded
        deep = "note:\n  a0: &a0 [1]\n" + "".join(f"  a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 200))
    config = tmp_path / "config.yaml"
    config.write_text(
        _valid_config_text(tmp_path, tiny_model_dir).replace(
            "settings:\n", "settings:\n  " + deep.replace("\n", "\n  ").rstrip() + "\n", 1
        )
    )
    before = snapshot(tmp_path)
    code, err = cli(["validate", "--config_file_path", str(config)], capsys)
    assert_one_error(code, err, "config.yaml: line", "more than 48 levels deep")
    assert_unchanged(before, snapshot(tmp_path))


def test_duplicate_key_names_both_lines(tmp_path, tiny_model_dir, capsys):
    text = _valid_config_text(tmp_path, tiny_model_dir)
    text = text.replace("    r: 2\n", "    r: 4\n    alpha: 4\n    r: 16\n", 1).replace(
        "    alpha: 4\n    target", "    target", 1
    )
    config = tmp_path / "config.yaml"
    config.write_text(text)
    lines = text.splitlines()
    first, second = (i + 1 for i, line in enumerate(lines) if line.startswith("    r: "))
    before = snapshot(tmp_path)
    code, err = cli(["validate", "--config_file_path", str(config)], capsys)
    assert_one_error(
        code, err, f"config.yaml: model.config.r: the key 'r' is given twice, at line {first} and line {second}"
    )
    assert_unchanged(before, snapshot(tmp_path))


# ------------------------------------------------------------------------------------ 11. the file system says no
def run_argv(config: Path, root: Path, experiment_id: str = "x", *extra: str) -> list[str]:
    return [
        "run",
        "--config_file_path",
        str(config),
        "--experiments_root_path",
        str(root),
        "--experiment_id",
        experiment_id,
        *extra,
    ]


def read_only_mount(folder: Path, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m lorafit ARGV` in a private mount namespace where `folder` is a read-only bind mount of itself:
    a real EROFS, which chmod cannot give (root ignores permissions). Needs `unshare` (root, or user namespaces)."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    command = [*unshare, "sh", "-c", script, "sh", str(folder), sys.executable, "-m", "lorafit", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def test_read_only_experiments_root_is_one_error_and_leaves_no_run_folder(tmp_path, tiny_model_dir):
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    (tmp_path / "exp").mkdir()
    before = snapshot(tmp_path)
    result = read_only_mount(tmp_path / "exp", run_argv(config, tmp_path / "exp"))
    assert_one_error(
        result.returncode,
        result.stderr,
        "--experiments_root_path",
        "cannot create the run folder",
        "Read-only file system",
        "EROFS",
    )
    assert_unchanged(before, snapshot(tmp_path))


def test_read_only_dataset_cache_is_one_error_naming_cache_path_and_leaves_no_run_folder(tmp_path, tiny_model_dir):
    (tmp_path / "cache").mkdir()
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    before = snapshot(tmp_path)
    result = read_only_mount(tmp_path / "cache", run_argv(config, tmp_path / "exp"))
    assert_one_error(
        result.returncode,
        result.stderr,
        "train_dataset.config.cache_path: cannot write the dataset cache",
        "Read-only file system",
    )
    assert not (tmp_path / "exp" / "x").exists()  # removed again: the same --experiment_id works once fixed
    assert_unchanged(before, snapshot(tmp_path), may_add=("exp",))


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_works(tmp_path, tiny_model_dir, capsys):
    """'Disk full' as RLIMIT_FSIZE (EFBIG, which Python gets instead of SIGXFSZ): the checkpoint's 45 KB tensor
    file cannot be written, every smaller file (metrics, logs) can."""
    import resource

    def config(steps: int) -> Path:
        c = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c", steps=steps)
        c["settings"]["intervals"]["checkpointing_interval_in_steps"] = 1
        return write_yaml(tmp_path / f"config{steps}.yaml", c)

    root = tmp_path / "exp"
    assert cli(run_argv(config(2), root, "r"), capsys)[0] == 0
    kept = snapshot(root / "r" / "checkpoints" / "step_000002")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    argv = run_argv(config(3), root, "r", "--resume_from", "latest", "--allow_config_change")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lorafit", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert_one_error(
        result.returncode,
        result.stderr,
        "saving a checkpoint: cannot write",
        "File too large",
        "EFBIG",
        "step_000002, is kept",
        "--resume_from latest",
    )
    assert snapshot(root / "r" / "checkpoints" / "step_000002") == kept
    assert not (root / "r" / "checkpoints" / "step_000003").exists()

    assert cli(argv, capsys)[0] == 0  # room again: the run continues from step 2
    assert (root / "r" / "checkpoints" / "step_000003" / "COMPLETE").is_file()


def test_experiments_root_that_is_a_file(tmp_path, tiny_model_dir, capsys):
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    (tmp_path / "exp").write_text("a file, not a folder")
    before = snapshot(tmp_path)
    code, err = cli(run_argv(config, tmp_path / "exp" / "inner"), capsys)
    assert_one_error(code, err, "--experiments_root_path", "exp is a file, not a folder")
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize(
    ("experiment_id", "fragments"),
    [
        ("x" * 300, ("--experiment_id: 300 characters", "at most 255 bytes")),
        ("../x", ("--experiment_id '../x': an experiment id is one folder name (no '/', no '..')",)),
        ("a/b", ("--experiment_id 'a/b'", "one folder name")),
        ("..", ("--experiment_id '..'", "one folder name")),
    ],
    ids=["300_characters", "dotdot_slash", "separator", "dotdot"],
)
def test_experiment_id_is_one_folder_name(experiment_id, fragments, tmp_path, tiny_model_dir, capsys):
    """Items 11 (a 300-character id) and 15 (ids that would write outside the experiments root)."""
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    (tmp_path / "exp").mkdir()
    before = snapshot(tmp_path)
    code, err = cli(run_argv(config, tmp_path / "exp" / "root", experiment_id), capsys)
    assert_one_error(code, err, *fragments)
    assert_unchanged(before, snapshot(tmp_path))


def test_merge_output_dir_that_is_a_file(tmp_path, tiny_model_dir, tiny_adapter, capsys):
    (tmp_path / "merged").write_bytes(b"my file")
    before = snapshot(tmp_path)
    code, err = cli(
        [
            "merge",
            "--base",
            str(tiny_model_dir),
            "--adapter",
            str(tiny_adapter),
            "--output_dir",
            str(tmp_path / "merged"),
        ],
        capsys,
    )
    assert_one_error(code, err, "--output_dir", "merged is a file, not a folder")
    assert_unchanged(before, snapshot(tmp_path))


# -------------------------------------------------------------------------------------------- 12, 16. generate
def test_generate_with_an_empty_prompt(tmp_path, tiny_model_dir, capsys):
    code, err = cli(["generate", "--model", str(tiny_model_dir), "--prompt", "", "--max_new_tokens", "1"], capsys)
    assert_one_error(code, err, "--prompt '' gives no token to start from")


def test_generate_names_model_for_a_bad_model(tmp_path, capsys):
    code, err = cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    message = assert_one_error(code, err, "--model:", "nope is neither a Hugging Face model folder")
    assert "--base" not in message


# -------------------------------------------------------------------------------------------- 13. a closed stdout
def test_run_piped_into_head_trains_to_the_end(tmp_path, tiny_model_dir):
    """`lorafit run ... | head -2`: the reader exits after two lines; the run still trains and writes its folder."""
    config = write_yaml(
        tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c", steps=2)
    )
    argv = " ".join(run_argv(config, tmp_path / "exp"))
    command = f'"{sys.executable}" -m lorafit {argv} 2>"{tmp_path}/stderr.txt" | head -2; exit "${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert result.returncode == 0, stderr
    assert len(result.stdout.splitlines()) == 2
    assert "Traceback" not in stderr
    assert "note: stdout was closed" in stderr
    run_dir = tmp_path / "exp" / "x"
    assert [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ] == [1, 2]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "report.md").is_file()


# ---------------------------------------------------------------------- 6, 7. wrong answers from validate and run
def test_tokenizer_larger_than_the_models_vocabulary_is_caught_at_validate(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    tokenizer.save_pretrained(tmp_path / "big_tokenizer")
    config = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c")
    config["tokenizer"]["config"]["path"] = str(tmp_path / "big_tokenizer")
    path = write_yaml(tmp_path / "config.yaml", config)
    before = snapshot(tmp_path)
    code, err = cli(["validate", "--config_file_path", str(path)], capsys)
    assert_one_error(code, err, "tokenizer: the tokenizer has 484 tokens but the model's embedding has 384 rows")
    assert_unchanged(before, snapshot(tmp_path))


def test_a_diverging_learning_rate_is_reported_as_such_not_as_wiring(tmp_path, tiny_model_dir, capsys):
    config = smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c", steps=3)
    config["settings"]["step_profile"] = {
        "local_train_micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "sequence_length": 32,
    }
    config["settings"]["intervals"]["checkpointing_interval_in_steps"] = 1
    config["model"]["config"].update(r=4, alpha=8, target_layers=["q_proj", "v_proj"])
    config["optimizer"]["config"]["lr"] = 1e30
    path = write_yaml(tmp_path / "config.yaml", config)
    code, err = cli(run_argv(path, tmp_path / "exp"), capsys)
    message = assert_one_error(code, err, "training diverged at step 2", "optimizer.config.lr")
    assert "gradient-flow" not in message and "not connected" not in message
    assert (tmp_path / "exp" / "x" / "checkpoints" / "step_000001" / "COMPLETE").is_file()  # the good one is kept


# ------------------------------------------------------------------------- 9. a stale distributed environment
def test_stale_distributed_environment_says_what_it_waits_for_and_times_out(tmp_path, tiny_model_dir):
    import socket

    with socket.socket() as s:  # a free port: nobody will ever join there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_yaml(tmp_path / "config.yaml", smallest_run_config(tiny_model_dir, LOREM, tmp_path / "cache" / "c"))
    env = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "LORAFIT_RENDEZVOUS_TIMEOUT": "2",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    result = subprocess.run(
        [sys.executable, "-m", "lorafit", *run_argv(config, tmp_path / "exp")],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    )
    assert "waiting up to 2 s for the other 1 process(es) to join this process" in result.stdout
    assert_one_error(
        result.returncode,
        result.stderr,
        f"MASTER_PORT={port} are set, but the other processes did not join within 2 s",
        "torchrun",
        "unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT",
    )
    assert not (tmp_path / "exp").exists()


def test_a_listing_into_a_closed_pipe_ends_quietly():
    """`lorafit components | head -1` where the reader is already gone: exit 0, no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lorafit", "components"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
