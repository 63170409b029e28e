"""What lorafit records beside PEFT's files, so that using an adapter the wrong way fails loudly, not quietly.

- `<adapter>/lorafit_training.json`: how the adapter was trained: `prompt_format` "chat" (instruction data rendered
  with the tokenizer's chat template) or "text" (plain text), or null when the data does not say (a Modalities
  .pbin). `lorafit generate` uses the chat template by default for a chat-trained adapter. PEFT, vLLM and
  transformers read only `adapter_config.json` and `adapter_model.safetensors`, so they ignore this file.
- `<merged folder>/lorafit_merge.json`: which adapter `lorafit merge` folded in (its path and the SHA-256 of its
  `adapter_model.safetensors`). Loading the same adapter onto that folder again would add its change twice, which
  gives fluent garbage with exit code 0; lorafit refuses it instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lorafit.atomic import write_atomic
from lorafit.errors import UserError

TRAINING_FILE = "lorafit_training.json"
MERGE_FILE = "lorafit_merge.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_sha256(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / WEIGHTS_NAME, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_format_of(dataset: Any) -> str | None:
    """ "chat" or "text" for lorafit's packed datasets (from the packed file's `kind`), None when unknown."""
    try:
        kind = dataset.data.kind
    except (AttributeError, RuntimeError):
        return None
    return {"instruction": "chat", "text": "text"}.get(kind)


def annotate_adapter(adapter_dir: Path, prompt_format: str | None, base_model_name_or_path: str | None = None) -> None:
    """After a run: write `lorafit_training.json`; with `settings.export.base_model_name_or_path`, put that value
    into `adapter_config.json` (where PEFT's AutoPeftModel looks for the base)."""
    adapter_dir = Path(adapter_dir)
    info = {"format": 1, "prompt_format": prompt_format}
    (adapter_dir / TRAINING_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if base_model_name_or_path is not None:
        config_file = adapter_dir / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_model_name_or_path
        write_atomic(config_file, json.dumps(config, indent=2) + "\n")


def read_training_info(adapter_dir: Path | None) -> dict[str, Any]:
    """The adapter's `lorafit_training.json`, or {} (an adapter from PEFT or an older lorafit)."""
    if adapter_dir is None:
        return {}
    try:
        info = json.loads((Path(adapter_dir) / TRAINING_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise UserError(f"{Path(adapter_dir) / TRAINING_FILE}: not valid JSON ({error}); delete it or fix it") from None
    return info if isinstance(info, dict) else {}


def record_merge(merged_dir: Path, adapter_dir: Path, base: str | Path) -> None:
    record = {
        "format": 1,
        "adapter": str(Path(adapter_dir).resolve()),
        "adapter_sha256": adapter_sha256(adapter_dir),
        "base": str(Path(base).resolve()) if Path(base).exists() else str(base),
    }
    (Path(merged_dir) / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_not_merged_already(model_dir: Path, adapter_dir: Path) -> None:
    """Refuse to load `adapter_dir` onto a folder that `lorafit merge` made from that same adapter."""
    file = Path(model_dir) / MERGE_FILE
    if not file.is_file() or not (Path(adapter_dir) / WEIGHTS_NAME).is_file():
        return
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("adapter_sha256") == adapter_sha256(adapter_dir):
        raise UserError(
            f"--adapter: {adapter_dir} is already merged into {model_dir} ({MERGE_FILE} records the merge of this "
            "adapter, same SHA-256); applying it again would add its change twice. Use the merged folder without "
            f"--adapter, or the adapter with its base model ({record.get('base')})"
        )
