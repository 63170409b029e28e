"""Read a YAML config and resolve its `${...}` interpolations with OmegaConf.

YAML is parsed with `yaml.SafeLoader` (no Python tags, so a config can never construct arbitrary objects; bounded
depth and alias expansion, unique keys: see `strict_yaml`) and only then handed to OmegaConf, which gives us
interpolation and the resolvers Modalities configs use:
`${cuda_env:LOCAL_RANK|RANK|WORLD_SIZE}` and `${lorafit_env:...}` (alias `${modalities_env:...}`).
Every value that fails to resolve is reported, each with its YAML path, in one error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException

from lorafit.config.strict_yaml import load_yaml_text
from lorafit.errors import ConfigError, Problem, join_path, nearest


@dataclass(frozen=True)
class ConfigEnv:
    """Values behind `${lorafit_env:NAME}`."""

    experiment_id: str = ""
    config_file_path: str = ""
    config_folder_path: str = ""
    experiments_root_path: str = "experiments"


_ENV: ContextVar[ConfigEnv] = ContextVar("lorafit_config_env", default=ConfigEnv())  # noqa: B039 - frozen

_CUDA_ENV_DEFAULTS = {"LOCAL_RANK": 0, "RANK": 0, "WORLD_SIZE": 1}


def _cuda_env(name: str) -> int:
    if name not in _CUDA_ENV_DEFAULTS:
        raise ValueError(f"cuda_env knows {', '.join(_CUDA_ENV_DEFAULTS)}, not '{name}'")
    return int(os.environ.get(name, _CUDA_ENV_DEFAULTS[name]))


def _lorafit_env(name: str) -> str:
    env = _ENV.get()
    if name not in ConfigEnv.__dataclass_fields__:
        raise ValueError(f"lorafit_env knows {', '.join(ConfigEnv.__dataclass_fields__)}, not '{name}'")
    return getattr(env, name)


def _node_env(name: str) -> int:
    """`${node_env:num_cpus}` (Modalities' data-preparation configs): this machine's CPU count."""
    if name != "num_cpus":
        raise ValueError(f"node_env knows num_cpus, not '{name}'")
    return os.cpu_count() or 1


def _register_resolvers() -> None:
    resolvers = (
        ("cuda_env", _cuda_env),
        ("lorafit_env", _lorafit_env),
        ("modalities_env", _lorafit_env),
        ("node_env", _node_env),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, fn)


@contextmanager
def config_env(env: ConfigEnv) -> Iterator[None]:
    token = _ENV.set(env)
    try:
        yield
    finally:
        _ENV.reset(token)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse the file safely; syntax errors carry the file, line and column."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        hint = ""
        if "python/" in str(e.problem):  # safe_load refuses !!python/... tags: say it is by design
            hint = "; configs may not contain Python tags: they name registered components (lorafit components)"
        raise ConfigError(f"{path}: invalid YAML at {where}: {e.problem or e.context}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of names to components, not {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{path}: top-level keys must be strings, got {bad_keys!r}")
    return data


def resolve(data: dict[str, Any], env: ConfigEnv | None = None) -> dict[str, Any]:
    """Resolve all `${...}`; collect every failure with its path."""
    _register_resolvers()
    try:
        cfg = OmegaConf.create(data, flags={"allow_objects": False})
    except OmegaConfBaseException as e:  # OmegaConf parses every `${...}` here, and checks key types
        hint = " (an interpolation is ${path.to.key} or ${resolver:args})" if isinstance(e, GrammarParseError) else ""
        where = str(getattr(e, "full_key", "") or "")
        raise (
            ConfigError(f"invalid value: {_first_line(e)}{hint}", field=where)
            if where
            else ConfigError(f"cannot read config: {_first_line(e)}")
        ) from None
    problems: list[Problem] = []
    with config_env(env or _ENV.get()):
        resolved = _resolve_node(cfg, "", problems)
    if problems:
        raise ConfigError("", problems=problems)
    return resolved


def load_config(path: Path, env: ConfigEnv | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config of the file at `path`, with command-line `overrides` (`key.path=value`) applied first."""
    path = Path(path)
    env = env or ConfigEnv(config_file_path=str(path), config_folder_path=str(path.parent))
    return resolve(apply_overrides(read_yaml(path), overrides), env)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each `dotted.key=value` of `overrides` set (OmegaConf's dotlist: `a.b=1`, `a.list[0]=x`,
    `a.c=[1,2]`; values parsed as YAML, `${...}` allowed). Only keys that exist may be overridden, so a
    typo is an error rather than a new key nobody reads; unresolved `${...}` elsewhere stay as they are."""
    if not overrides:
        return data
    _register_resolvers()
    problems: list[Problem] = []
    for item in overrides:
        key, sep, _value = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem("", f"override {item!r} is not key.path=value"))
            continue
        if not _has_key(data, key.strip()):
            problems.append(
                Problem(
                    key.strip(),
                    f"override {item!r}: no such key in the config{_suggest(data, key)} "
                    "(only existing keys, or new keys of a component's config, which its "
                    "component checks, can be set)",
                )
            )
    if problems:
        raise ConfigError("", problems=problems)
    try:
        cfg = OmegaConf.create(data, flags={"allow_objects": False})
        for item in overrides:
            key, _, value = item.partition("=")
            OmegaConf.update(cfg, key.strip(), yaml.safe_load(value) if value.strip() else "", merge=False)
        return OmegaConf.to_container(cfg, resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot apply the overrides {list(overrides)}: {_first_line(e)}") from None


def _has_key(data: Any, dotted: str) -> bool:
    """`dotted` exists, or is a new key directly in a component's `config` mapping (checked by its component)."""
    parts = dotted.replace("]", "").replace("[", ".").split(".")
    if len(parts) >= 2 and parts[-2] == "config" and _has_key(data, ".".join(parts[:-1])):
        return True
    node = data
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _suggest(data: Any, dotted: str) -> str:
    """' (did you mean 'a.b.c'?)' for the first part of `dotted` that does not exist, as typos in the file get."""
    parts = dotted.strip().replace("]", "").replace("[", ".").split(".")
    node, done = data, []
    for part in parts:
        if isinstance(node, dict) and part in node:
            node, done = node[part], [*done, part]
            continue
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node, done = node[int(part)], [*done, part]
            continue
        best = nearest(part, [str(k) for k in node]) if isinstance(node, dict) else None
        if best is None:
            where = _indexed(".".join(done))
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else ""
            return f"; '{where}' has {keys}" if done and keys else ""
        return f" (did you mean '{_indexed('.'.join([*done, best, *parts[len(done) + 1 :]]))}'?)"
    return ""


def _indexed(dotted: str) -> str:
    """`a.keys.0` -> `a.keys[0]`, as the user writes list items."""
    return re.sub(r"[.]([0-9]+)(?=[.]|$)", r"[\1]", dotted)


def _resolve_node(node: Any, path: str, problems: list[Problem]) -> Any:
    if isinstance(node, DictConfig):
        out = {}
        for key in node:
            child_path = join_path(path, str(key))
            try:
                child = node._get_node(key)  # the raw node: its interpolation resolves below, one at a time
                value = node[key] if not isinstance(child, (DictConfig, ListConfig)) else child
            except OmegaConfBaseException as e:
                problems.append(Problem(child_path, f"cannot resolve {_raw(node, key)}: {_first_line(e)}"))
                continue
            out[key] = _resolve_node(value, child_path, problems)
        return out
    if isinstance(node, ListConfig):
        out_list = []
        for i in range(len(node)):
            child_path = f"{path}[{i}]"
            try:
                child = node._get_node(i)
                value = node[i] if not isinstance(child, (DictConfig, ListConfig)) else child
            except OmegaConfBaseException as e:
                problems.append(Problem(child_path, f"cannot resolve {_raw(node, i)}: {_first_line(e)}"))
                continue
            out_list.append(_resolve_node(value, child_path, problems))
        return out_list
    return node


def _raw(node: Any, key: Any) -> str:
    try:
        return repr(node._get_node(key)._value())
    except Exception:  # the raw text is only decoration for the message
        return "value"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
