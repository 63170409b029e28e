"""Property tests for the config loader and the object graph: whatever the input, the outcome is a result or a
`ConfigError` (a user error with YAML paths), never another exception, and never code that the config names.

- any text as a config file -> `read_yaml` -> `resolve` -> `check_run_config`;
- random YAML-ish configs (components with real and made-up keys, references to present and missing names,
  `${...}` interpolations, odd scalars) through the same path;
- random graphs over a private registry: `check()` never raises, reports every reference cycle, and when it reports
  nothing, building every entity succeeds (or fails with the builder's own UserError), with BY_REFERENCE shared.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.config.graph import ConfigGraph
from lorafit.config.loader import read_yaml, resolve
from lorafit.config.registry import Component, ComponentConfig, Registry
from lorafit.errors import ConfigError, UserError
from lorafit.run.build import check_run_config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = ["model", "train_dataset", "tokenizer", "optimizer", "scheduler", "settings", "base", "lora", "data", "x"]
COMPONENT_KEYS = [
    "model",
    "dataset",
    "tokenizer",
    "optimizer",
    "scheduler",
    "parallelism",
    "evaluator",
    "checkpoint_loading",
    "os.system",
    "builtins.eval",
    "",
]
VARIANT_KEYS = [
    "lora",
    "huggingface_pretrained_model",
    "text",
    "packed",
    "huggingface",
    "adamw",
    "cosine",
    "constant",
    "none",
    "torch",
    "checkpointed",
    "subprocess.Popen",
    "?",
]
FIELDS = [
    "r",
    "alpha",
    "target_layers",
    "model",
    "path",
    "tokenizer",
    "lr",
    "warmup_steps",
    "device",
    "precision",
    "step_profile",
    "sequence_length",
    "num_target_steps",
    "training_target",
    "seed",
    "_target_",
    "config",
]
INTERPOLATIONS = [
    "${settings.seed}",
    "${x}",
    "${model.config.r}",
    "${cuda_env:RANK}",
    "${cuda_env:NOPE}",
    "${lorafit_env:experiment_id}",
    "${lorafit_env:nope}",
    "${modalities_env:config_file_path}",
    "${unknown_resolver:1}",
    "${",
    "${}",
    "${..up}",
    "${oc.decode:'[1, 2'}",
    "a ${x} b",
    "$${x}",
    "${oc.select:nope, 3}",
    "${settings}",
    "${x.y.z}",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(INTERPOLATIONS),
    st.sampled_from(NAMES + VARIANT_KEYS),
)


def _reference() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"instance_key": st.one_of(st.sampled_from(NAMES), scalars)},
        optional={
            "pass_type": st.one_of(st.sampled_from(["BY_REFERENCE", "BY_VALUE", "BY_POINTER"]), scalars),
            "config": st.just({}),
        },
    )


def _component(children: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"component_key": st.one_of(st.sampled_from(COMPONENT_KEYS), scalars)},
        optional={
            "variant_key": st.one_of(st.sampled_from(VARIANT_KEYS), scalars),
            "config": st.one_of(st.dictionaries(st.sampled_from(FIELDS), children, max_size=4), scalars),
            "configs": st.just({}),
        },
    )


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5), st.integers()), children, max_size=3),
        _component(children),
        _reference(),
    ),
    max_leaves=12,
)
configs = st.dictionaries(st.sampled_from(NAMES), values, max_size=6)


def _check_all(data: Any) -> None:
    """The product's path from parsed YAML to a checked graph; only ConfigError may leave it."""
    try:
        resolved = resolve(data)
        check_run_config(resolved)
    except ConfigError as error:
        # every problem of a parsed config is located: the user is told where in the YAML to look
        assert error.problems and all(p.path and p.message for p in error.problems), error.problems


@pytest.fixture(scope="module")
def scratch() -> Path:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "config.yaml"


YAML_PIECES = [
    "model:",
    "  component_key: model",
    "  variant_key: lora",
    "  config: {r: 0}",
    "- a",
    "{",
    "}",
    "[",
    "&a x",
    "*a",
    "*missing",
    "!!python/object/apply:os.system ['true']",
    "!!binary aGk=",
    "2024-01-01",
    "? complex key",
    ": v",
    "\t",
    "'",
    '"',
    "${x}",
    "%YAML 1.2",
    "---",
    "...",
    "<<: *a",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "~",
    ".nan",
    "0x1F",
    "1e400",
    "\ufeff",
    "\x00",
]


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(YAML_PIECES), max_size=12).map("\n".join)))
def test_any_text_is_a_checked_config_or_a_config_error(scratch, text):
    try:
        scratch.write_text(text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        return
    try:
        data = read_yaml(scratch)
    except ConfigError as error:
        assert str(scratch) in error.render() or error.problems
        return
    assert isinstance(data, dict)
    _check_all(data)


@SETTINGS
@given(configs)
def test_random_configs_check_or_fail_with_a_config_error(config):
    _check_all(config)


@SETTINGS
@given(configs)
def test_random_configs_through_yaml_text(scratch, config):
    try:
        text = yaml.safe_dump(config, allow_unicode=True)
    except yaml.YAMLError:
        return
    scratch.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = read_yaml(scratch)
    except ConfigError:
        return
    _check_all(data)


# ------------------------------------------------------------------------------------------------ private graphs
class LeafConfig(ComponentConfig):
    x: int = 0


class BoxConfig(ComponentConfig):
    inner: Component("leaf", "box") | None = None
    items: list[Component("leaf", "box")] = []


class BoomConfig(ComponentConfig):
    pass


class Built:
    def __init__(self, kind: str, config: Any):
        self.kind, self.config = kind, config


def private_registry() -> Registry:
    registry = Registry()
    registry.register("leaf", "plain", LeafConfig)(lambda c: Built("leaf", c))
    registry.register("box", "plain", BoxConfig)(lambda c: Built("box", c))

    def boom(_config):
        raise UserError("this builder always fails", field="x")

    registry.register("leaf", "boom", BoomConfig)(boom)
    return registry


GRAPH_NAMES = ["a", "b", "c", "d"]
graph_refs = st.fixed_dictionaries(
    {
        "instance_key": st.sampled_from([*GRAPH_NAMES, "missing"]),
        "pass_type": st.sampled_from(["BY_REFERENCE", "BY_VALUE"]),
    }
)


def _graph_component(children):
    return st.one_of(
        st.fixed_dictionaries(
            {
                "component_key": st.just("leaf"),
                "variant_key": st.sampled_from(["plain", "boom"]),
                "config": st.fixed_dictionaries({}, optional={"x": st.integers(-2, 2)}),
            }
        ),
        st.fixed_dictionaries(
            {
                "component_key": st.just("box"),
                "variant_key": st.just("plain"),
                "config": st.fixed_dictionaries(
                    {}, optional={"inner": children, "items": st.lists(children, max_size=2)}
                ),
            }
        ),
    )


graph_values = st.recursive(st.one_of(graph_refs, _graph_component(graph_refs)), _graph_component, max_leaves=6)
graphs = st.dictionaries(st.sampled_from(GRAPH_NAMES), graph_values, min_size=1, max_size=4)


def _edges(value: Any) -> list[str]:
    if isinstance(value, dict) and "instance_key" in value:
        return [value["instance_key"]]
    if isinstance(value, dict):
        return [e for v in value.values() for e in _edges(v)]
    if isinstance(value, list):
        return [e for v in value for e in _edges(v)]
    return []


def _has_cycle(config: dict) -> bool:
    edges = {name: [t for t in _edges(v) if t in config] for name, v in config.items()}
    state: dict[str, str] = {}

    def visit(name: str) -> bool:
        state[name] = "active"
        for target in edges[name]:
            if state.get(target) == "active" or (state.get(target) is None and visit(target)):
                return True
        state[name] = "done"
        return False

    return any(state.get(n) is None and visit(n) for n in edges)


@settings(max_examples=300, deadline=None)
@given(graphs)
def test_graph_check_finds_every_cycle_and_a_clean_graph_builds(config):
    graph = ConfigGraph(config, private_registry())
    problems = graph.check()  # never raises
    messages = [p.message for p in problems]
    if _has_cycle(config):
        assert any("reference cycle" in m for m in messages), messages
    if any("missing" in _edges(v) for v in config.values()):
        assert any("reference to missing instance 'missing'" in m for m in messages), messages
    if problems:
        return
    built = {}
    for name in config:
        try:
            built[name] = graph.build(name)
        except UserError as error:  # only the builder that always fails
            assert "this builder always fails" in error.render()
            return
    for name, value in config.items():  # BY_REFERENCE is the one shared instance
        if isinstance(value, dict) and value.get("pass_type") == "BY_REFERENCE" and value["instance_key"] in built:
            assert built[name] is built[value["instance_key"]]


def test_a_config_cannot_make_lorafit_import_a_module():
    """Component keys, variant keys and field values that are module paths stay strings: nothing is imported."""
    import sys

    modules = [
        m for m in ("antigravity", "this", "turtle", "http.server", "smtplib", "webbrowser") if m not in sys.modules
    ]
    assert modules
    config = {
        name.replace(".", "_"): {"component_key": name, "variant_key": name, "config": {"_target_": name}}
        for name in modules
    }
    config["model"] = {"component_key": "model", "variant_key": "webbrowser.open", "config": {"url": "x"}}
    config["optimizer"] = {"_target_": "smtplib.SMTP", "host": "localhost"}
    with pytest.raises(ConfigError) as error:
        check_run_config(resolve(config))
    rendered = error.value.render()
    assert "unknown component_key 'antigravity'" in rendered or "antigravity" not in modules
    assert "unknown variant_key 'webbrowser.open' for component_key 'model'" in rendered
    assert [m for m in modules if m in sys.modules] == []
