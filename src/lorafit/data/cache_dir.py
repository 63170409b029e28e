"""Where the tokenized dataset caches go when a dataset names no `cache_path`: lorafit's own cache folder.

`$LORAFIT_CACHE_DIR`, else `$XDG_CACHE_HOME/lorafit`, else `~/.cache/lorafit`; a dataset's cache is
`<that>/datasets/<file stem>-<12 hex digits of the sha256 of its absolute path>.<kind>` (+ .bin, .json, ...).
One prefix per source file, so two `train.jsonl` in different folders never share one; whether the cache is up
to date is decided by content (the stamp of lorafit.datasets.text_files), as with an explicit `cache_path`. The user's
data folder is never written to.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV_VAR = "LORAFIT_CACHE_DIR"


def cache_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorafit"


def default_dataset_prefix(source: Path, kind: str) -> Path:
    """The cache prefix of `source` in lorafit's cache folder."""
    absolute = str(Path(source).resolve())
    digest = hashlib.sha256(absolute.encode("utf-8")).hexdigest()[:12]
    return cache_root() / "datasets" / f"{Path(source).stem}-{digest}.{kind}"
