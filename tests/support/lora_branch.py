"""The vendored LoRA code of Modalities' `lora` and `lora_2` branches (tests/modalities_ref/lora_branch/), loaded
from its files as it is: its `utils.py` imports `modalities.models.lora.lora_layers`, which is answered with the
vendored `lora_layers.py` only while `utils.py` loads (no `modalities` package needed, none shadowed).

Also loaded by tests/modalities_ref/reference.py inside modalities 0.5.0's venv, by file path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

VENDORED = Path(__file__).resolve().parents[1] / "modalities_ref" / "lora_branch"
BRANCHES = ("lora", "lora_2")
_IMPORTED_AS = "modalities.models.lora.lora_layers"  # the name utils.py imports the layers by
_loaded: dict[str, SimpleNamespace] = {}


def _module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_lora_branch(branch: str = "lora") -> SimpleNamespace:
    """`lora_layers` and `utils` (convert_to_lora, ...) of `branch`, each a module of its own."""
    if branch not in _loaded:
        folder = VENDORED / branch
        layers = _module(f"lora_branch_{branch}.lora_layers", folder / "lora_layers.py")
        previous = sys.modules.get(_IMPORTED_AS)
        sys.modules[_IMPORTED_AS] = layers
        try:
            utils = _module(f"lora_branch_{branch}.utils", folder / "utils.py")
        finally:
            if previous is None:
                del sys.modules[_IMPORTED_AS]
            else:
                sys.modules[_IMPORTED_AS] = previous
        _loaded[branch] = SimpleNamespace(lora_layers=layers, utils=utils)
    return _loaded[branch]
