"""The object graph: turns a resolved config dict into built components.

Three kinds of values can appear anywhere in a config:
- a component `{component_key, variant_key, config}`: built by its registered builder (inline = a new instance);
- a reference `{instance_key: NAME, pass_type: BY_REFERENCE | BY_VALUE}`: BY_REFERENCE is the one shared instance of
  the top-level entity NAME, BY_VALUE a fresh instance built from NAME's definition;
- anything else (scalars, plain dicts and lists, which may contain the two above).

`check()` validates the whole graph without building anything (components become `Pending` placeholders) and
collects every problem; `build(name)` builds an entity and what it needs, each shared instance once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from lorafit.config.registry import REGISTRY, Pending, Registry
from lorafit.errors import ConfigError, Problem, UserError, did_you_mean, join_path

COMPONENT_KEYS = {"component_key", "variant_key", "config"}
REFERENCE_KEYS = {"instance_key", "pass_type"}
PASS_TYPES = ("BY_REFERENCE", "BY_VALUE")


def is_component(value: Any) -> bool:
    return isinstance(value, dict) and "component_key" in value


def component_blocks(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(YAML path, block) of every component block in a config value, however deep (references not followed)."""
    if isinstance(value, dict):
        if is_component(value):
            yield path, value
        for key, item in value.items():
            yield from component_blocks(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from component_blocks(item, f"{path}[{i}]")


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and "instance_key" in value


class ConfigGraph:
    def __init__(self, config: dict[str, Any], registry: Registry = REGISTRY):
        self.config = config
        self.registry = registry
        self._built: dict[str, Any] = {}
        self._building: list[str] = []
        # after check(): each top-level entity as checked (components as `Pending`, with their typed config), and
        # every component block that validated, by YAML path: what run-level decisions are taken from
        self.checked: dict[str, Any] = {}
        self.components: dict[str, Pending] = {}

    # ---------------------------------------------------------------- checking
    def check(self, names: list[str] | None = None) -> list[Problem]:
        """Every problem in the entities `names` (default: all), without building anything."""
        problems: list[Problem] = []
        for name in names if names is not None else list(self.config):
            self.checked[name] = self.placeholder(self.config[name], name, problems)
        problems += self._cycles()
        return _unique(problems)

    def entity(self, value: Any) -> Any:
        """A checked value with a reference's stand-in replaced by the entity it names (as checked)."""
        seen = set()
        while isinstance(value, Pending) and value.refers_to is not None and value.refers_to not in seen:
            seen.add(value.refers_to)
            value = self.checked.get(value.refers_to)
        return value

    def placeholder(self, value: Any, path: str, problems: list[Problem]) -> Any:
        """`value` with components replaced by `Pending` stand-ins; problems found on the way are appended."""
        if is_reference(value):
            return self._check_reference(value, path, problems)
        if is_component(value):
            return self._check_component(value, path, problems)
        if isinstance(value, dict):
            return {k: self.placeholder(v, join_path(path, str(k)), problems) for k, v in value.items()}
        if isinstance(value, list):
            return [self.placeholder(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return value

    def _check_reference(self, ref: dict, path: str, problems: list[Problem]) -> Any:
        extra = set(ref) - REFERENCE_KEYS
        if extra:
            problems.append(
                Problem(
                    path,
                    f"a reference has exactly the keys instance_key and pass_type; "
                    f"unexpected: {', '.join(sorted(map(str, extra)))}",
                )
            )
        if ref.get("pass_type", "BY_REFERENCE") not in PASS_TYPES:
            problems.append(
                Problem(
                    join_path(path, "pass_type"),
                    f"invalid pass_type {ref.get('pass_type')!r}; valid: {', '.join(PASS_TYPES)}",
                )
            )
        if "pass_type" not in ref:
            problems.append(Problem(path, "a reference needs pass_type: BY_REFERENCE or BY_VALUE"))
        name = ref.get("instance_key")
        target = self.config.get(name) if isinstance(name, str) else None
        if not is_component(target) and not is_reference(target):
            entities = sorted(k for k, v in self.config.items() if is_component(v))
            if isinstance(name, str) and name in self.config:
                why = f"'{name}' is not a component (it has no component_key)"
            else:
                why = f"reference to missing instance '{name}'{did_you_mean(str(name), entities)}"
            problems.append(
                Problem(
                    join_path(path, "instance_key"),
                    f"{why}; components defined at the top level: {', '.join(entities) or 'none'}",
                )
            )
            return Pending("?", "?", path, known=False)
        seen = {path}
        final = name
        while is_reference(target):  # an alias of an alias: follow to the component
            nxt = target.get("instance_key")
            if nxt in seen or not (is_component(self.config.get(nxt)) or is_reference(self.config.get(nxt))):
                return Pending("?", "?", path, known=False)  # reported where that alias is defined, or as a cycle
            seen.add(nxt)
            final, target = nxt, self.config[nxt]
        ck = str(target.get("component_key"))
        # an unknown component_key is reported where that component is defined
        return Pending(
            ck,
            str(target.get("variant_key")),
            str(name),
            known=ck in self.registry.component_keys(),
            refers_to=str(final),
        )

    def _check_component(self, comp: dict, path: str, problems: list[Problem]) -> Pending:
        ck, vk = comp.get("component_key"), comp.get("variant_key")
        pending = Pending(str(ck), str(vk), path)
        extra = set(comp) - COMPONENT_KEYS
        if extra:
            for key in sorted(map(str, extra)):
                problems.append(
                    Problem(
                        join_path(path, key),
                        f"unknown key '{key}' next to component_key"
                        f"{did_you_mean(key, COMPONENT_KEYS)}; a component has component_key, "
                        "variant_key and config",
                    )
                )
        if "variant_key" not in comp:
            problems.append(
                Problem(
                    path,
                    f"component '{ck}' needs a variant_key; valid: "
                    f"{', '.join(self.registry.variant_keys(str(ck))) or '(unknown component)'}",
                )
            )
            return pending
        try:
            spec = self.registry.get(str(ck), str(vk))
        except LookupError as e:
            field, message = e.args
            problems.append(Problem(join_path(path, field), message))
            pending.known = field != "component_key"  # an unknown component_key is this one problem, not two
            return pending
        raw = comp.get("config") or {}
        if not isinstance(raw, dict):
            problems.append(
                Problem(join_path(path, "config"), f"must be a mapping of keys to values, not {type(raw).__name__}")
            )
            return pending
        cfg_path = join_path(path, "config")
        values = {k: self.placeholder(v, join_path(cfg_path, str(k)), problems) for k, v in raw.items()}
        try:
            pending.config = spec.config_model.model_validate(values)
        except ValidationError as e:
            problems += pydantic_problems(e, cfg_path, spec.config_model)
        else:
            self.components[path] = pending
        return pending

    def _cycles(self) -> list[Problem]:
        edges = {name: _references_in(value) for name, value in self.config.items()}
        problems, state = [], {}

        def visit(name: str, trail: list[str]) -> None:
            state[name] = "active"
            for ref_path, target in edges.get(name, []):
                if state.get(target) == "active":
                    cycle = [*trail[trail.index(target) :], target] if target in trail else [name, target]
                    problems.append(Problem(join_path(name, ref_path), "reference cycle: " + " -> ".join(cycle)))
                elif target in edges and state.get(target) is None:
                    visit(target, [*trail, target])
            state[name] = "done"

        for name in edges:
            if state.get(name) is None:
                visit(name, [name])
        return problems

    # ---------------------------------------------------------------- building
    def build(self, name: str) -> Any:
        """The shared instance of top-level entity `name` (built on first use)."""
        if name in self._built:
            return self._built[name]
        if name in self._building:
            cycle = " -> ".join([*self._building[self._building.index(name) :], name])
            raise ConfigError(f"reference cycle: {cycle}")
        self._building.append(name)
        try:
            obj = self.build_value(self.config[name], name)
        finally:
            self._building.pop()
        self._built[name] = obj
        return obj

    def build_value(self, value: Any, path: str) -> Any:
        if is_reference(value):
            name = value["instance_key"]
            if name not in self.config:
                raise ConfigError(f"reference to missing instance '{name}'", field=join_path(path, "instance_key"))
            if value.get("pass_type", "BY_REFERENCE") == "BY_VALUE":
                return self.build_value(self.config[name], name)  # a fresh object from the same definition
            return self.build(name)
        if is_component(value):
            return self._build_component(value, path)
        if isinstance(value, dict):
            return {k: self.build_value(v, join_path(path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [self.build_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    def _build_component(self, comp: dict, path: str) -> Any:
        try:
            spec = self.registry.get(str(comp["component_key"]), str(comp.get("variant_key")))
        except LookupError as e:
            raise ConfigError(e.args[1], field=join_path(path, e.args[0])) from None
        cfg_path = join_path(path, "config")
        raw = comp.get("config") or {}
        values = {k: self.build_value(v, join_path(cfg_path, str(k))) for k, v in raw.items()}
        try:
            config = spec.config_model.model_validate(values)
        except ValidationError as e:
            raise ConfigError("", problems=pydantic_problems(e, cfg_path, spec.config_model)) from None
        try:
            return spec.builder(config)
        except UserError as e:
            raise e.prefixed(cfg_path) from None


def pydantic_problems(error: ValidationError, base: str, model: type | None = None) -> list[Problem]:
    """Pydantic's errors as problems with YAML paths, phrased for a YAML author."""
    problems = []
    for item in error.errors(include_url=False):
        loc = item.get("loc", ())
        path = base
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else join_path(path, str(part))
        kind, msg = item.get("type", ""), item.get("msg", "")
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            valid = _field_names(model, loc[:-1])
            msg = f"unknown key '{key}'{did_you_mean(key, valid)}; valid keys: {', '.join(valid) or 'none'}"
        elif kind == "missing":
            msg = "missing required key"
        else:
            msg = msg.removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], (dict, Pending)):
                msg += f" (got {item['input']!r})"
        problems.append(Problem(path, msg))
    return problems


def _field_names(model: type | None, loc: tuple) -> list[str]:
    """Valid keys of the (possibly nested) pydantic model at `loc`."""
    for part in loc:
        if model is None or not hasattr(model, "model_fields"):
            return []
        field = model.model_fields.get(str(part))
        model = getattr(field, "annotation", None) if field else None
    if model is None or not hasattr(model, "model_fields"):
        return []
    return sorted(model.model_fields)


def _references_in(value: Any, path: str = "") -> list[tuple[str, str]]:
    if is_reference(value):
        return [(path, str(value.get("instance_key")))]
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _references_in(v, join_path(path, str(k)))]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in _references_in(v, f"{path}[{i}]")]
    return []


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out
