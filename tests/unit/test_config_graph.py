"""The config system: references, BY_VALUE, nesting, interpolation, resolvers, registration, and each error kind."""

from __future__ import annotations

import textwrap
from typing import Literal

import pytest
from pydantic import Field

from lorafit.config.graph import ConfigGraph
from lorafit.config.loader import ConfigEnv, load_config, read_yaml, resolve
from lorafit.config.registry import Component, ComponentConfig, Registry
from lorafit.errors import ConfigError

REG = Registry()


class Thing:
    def __init__(self, name, parts=(), size=1):
        self.name, self.parts, self.size = name, list(parts), size


class LeafConfig(ComponentConfig):
    name: str
    size: int = Field(1, ge=1, le=100)
    mode: Literal["fast", "slow"] = "fast"


class BoxConfig(ComponentConfig):
    name: str = "box"
    inner: Component("leaf", "box")
    extras: list[Component("leaf")] = []


@REG.register("leaf", "basic", LeafConfig)
def build_leaf(config: LeafConfig) -> Thing:
    return Thing(config.name, size=config.size)


@REG.register("box", "basic", BoxConfig)
def build_box(config: BoxConfig) -> Thing:
    return Thing(config.name, [config.inner, *config.extras])


def leaf(name="a", **config):
    return {"component_key": "leaf", "variant_key": "basic", "config": {"name": name, **config}}


def ref(name, pass_type="BY_REFERENCE"):
    return {"instance_key": name, "pass_type": pass_type}


def problems_of(config) -> dict[str, str]:
    return {p.path: p.message for p in ConfigGraph(config, REG).check()}


def test_by_reference_is_one_shared_instance_and_by_value_a_fresh_one():
    config = {
        "shared": leaf("s"),
        "box1": {"component_key": "box", "variant_key": "basic", "config": {"inner": ref("shared")}},
        "box2": {"component_key": "box", "variant_key": "basic", "config": {"inner": ref("shared")}},
        "box3": {"component_key": "box", "variant_key": "basic", "config": {"inner": ref("shared", "BY_VALUE")}},
    }
    graph = ConfigGraph(config, REG)
    assert graph.check() == []
    b1, b2, b3 = graph.build("box1"), graph.build("box2"), graph.build("box3")
    assert b1.parts[0] is b2.parts[0] is graph.build("shared")
    assert b3.parts[0] is not b1.parts[0] and b3.parts[0].name == "s"


def test_forward_and_backward_references_nested_and_list_components():
    config = {
        "outer": {
            "component_key": "box",
            "variant_key": "basic",
            "config": {"inner": ref("later"), "extras": [leaf("x"), ref("earlier")]},
        },
        "earlier": leaf("e"),
        "later": {"component_key": "box", "variant_key": "basic", "config": {"name": "L", "inner": leaf("in")}},
    }
    graph = ConfigGraph(config, REG)
    assert graph.check() == []
    outer = graph.build("outer")
    assert [p.name for p in outer.parts] == ["L", "x", "e"]
    assert outer.parts[0].parts[0].name == "in"
    assert outer.parts[2] is graph.build("earlier")


def test_inline_components_are_new_instances_each_time():
    config = {"b": {"component_key": "box", "variant_key": "basic", "config": {"inner": leaf(), "extras": [leaf()]}}}
    box = ConfigGraph(config, REG).build("b")
    assert box.parts[0] is not box.parts[1]


def test_interpolation_and_resolvers(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent("""
        settings:
          size: 7
          rank: ${cuda_env:RANK}
          local_rank: ${cuda_env:LOCAL_RANK}
          world: ${cuda_env:WORLD_SIZE}
          exp: ${lorafit_env:experiment_id}
          cfg: ${modalities_env:config_file_path}
          folder: ${lorafit_env:config_folder_path}
        thing:
          component_key: leaf
          variant_key: basic
          config:
            name: n-${settings.exp}
            size: ${settings.size}
    """)
    )
    config = load_config(
        path, ConfigEnv(experiment_id="e1", config_file_path=str(path), config_folder_path=str(tmp_path))
    )
    s = config["settings"]
    assert (s["rank"], s["local_rank"], s["world"]) == (3, 0, 4)
    assert s["exp"] == "e1" and s["cfg"] == str(path) and s["folder"] == str(tmp_path)
    thing = ConfigGraph(config, REG).build("thing")
    assert thing.name == "n-e1" and thing.size == 7


def test_custom_component_through_public_api():
    from lorafit import register_component
    from lorafit.config.registry import REGISTRY

    class PingConfig(ComponentConfig):
        times: int = 2

    @register_component("ping_test", "echo", PingConfig)
    def build_ping(config: PingConfig):
        return "ping" * config.times

    try:
        graph = ConfigGraph(
            {"p": {"component_key": "ping_test", "variant_key": "echo", "config": {"times": 3}}}, REGISTRY
        )
        assert graph.build("p") == "pingpingping"
    finally:
        REGISTRY._specs.pop(("ping_test", "echo"))  # the global registry outlives this test


# ----------------------------------------------------------------------------------------------- errors
def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a:\n  b: [1, 2\n  c: 3\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "column" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        read_yaml(tmp_path / "nope.yaml")


def test_unknown_component_key_lists_valid_and_nearest():
    msgs = problems_of({"x": {"component_key": "leef", "variant_key": "basic", "config": {}}})
    assert "unknown component_key 'leef'" in msgs["x.component_key"]
    assert "did you mean 'leaf'" in msgs["x.component_key"] and "valid: box, leaf" in msgs["x.component_key"]


def test_unknown_variant_key():
    msgs = problems_of({"x": {"component_key": "leaf", "variant_key": "basik", "config": {}}})
    assert "unknown variant_key 'basik'" in msgs["x.variant_key"] and "'basic'" in msgs["x.variant_key"]


def test_unknown_config_key_suggests_nearest():
    msgs = problems_of({"x": leaf(sise=3)})
    assert "unknown key 'sise'" in msgs["x.config.sise"] and "did you mean 'size'" in msgs["x.config.sise"]


def test_missing_required_key_wrong_type_and_range_all_reported_at_once():
    msgs = problems_of(
        {
            "x": {"component_key": "leaf", "variant_key": "basic", "config": {"size": 0}},
            "y": leaf(size="big"),
            "z": leaf(mode="medium"),
        }
    )
    assert msgs["x.config.name"] == "missing required key"
    assert "greater than or equal to 1" in msgs["x.config.size"]
    assert "valid integer" in msgs["y.config.size"] and "'big'" in msgs["y.config.size"]
    assert "'fast'" in msgs["z.config.mode"] and "'medium'" in msgs["z.config.mode"]


def test_error_path_inside_list():
    msgs = problems_of(
        {
            "b": {
                "component_key": "box",
                "variant_key": "basic",
                "config": {"inner": leaf(), "extras": [leaf(), leaf(size=-1)]},
            }
        }
    )
    assert "b.config.extras[1].config.size" in msgs


def test_missing_instance_lists_existing_entities():
    msgs = problems_of(
        {"only": leaf(), "b": {"component_key": "box", "variant_key": "basic", "config": {"inner": ref("onyl")}}}
    )
    message = msgs["b.config.inner.instance_key"]
    assert "missing instance 'onyl'" in message and "did you mean 'only'" in message and "only" in message


def test_bad_pass_type():
    msgs = problems_of(
        {"a": leaf(), "b": {"component_key": "box", "variant_key": "basic", "config": {"inner": ref("a", "BY_COPY")}}}
    )
    assert "BY_REFERENCE, BY_VALUE" in msgs["b.config.inner.pass_type"]


def test_reference_cycle_printed():
    box = {"component_key": "box", "variant_key": "basic"}
    msgs = problems_of({"a": {**box, "config": {"inner": ref("b")}}, "b": {**box, "config": {"inner": ref("a")}}})
    assert any("reference cycle: a -> b -> a" in m or "reference cycle: b -> a -> b" in m for m in msgs.values())


def test_wrong_component_kind_for_field():
    msgs = problems_of({"b": {"component_key": "box", "variant_key": "basic", "config": {"inner": 5}}})
    assert "expected a 'leaf' or 'box' component" in msgs["b.config.inner"]


def test_unresolvable_interpolation_names_path():
    with pytest.raises(ConfigError) as e:
        resolve(
            {
                "settings": {"a": 1},
                "x": {"config": {"size": "${settings.b}", "ok": "${settings.a}"}},
                "y": ["${nope.z}"],
            }
        )
    paths = {p.path for p in e.value.problems}
    assert paths == {"x.config.size", "y[0]"}
    assert "settings.b" in e.value.render()


def test_unknown_resolver_argument():
    with pytest.raises(ConfigError, match="cuda_env knows LOCAL_RANK, RANK, WORLD_SIZE"):
        resolve({"x": "${cuda_env:GLOBAL_RANK}"})


def test_the_component_table_lists_exactly_what_lorafit_registers():
    from lorafit.components import BUILTIN_COMPONENTS, load_builtin_components
    from lorafit.config.registry import REGISTRY

    load_builtin_components()
    registered = {
        (s.component_key, s.variant_key): s.builder.__module__
        for s in REGISTRY.specs()
        if s.builder.__module__.startswith("lorafit.")
    }
    assert registered == BUILTIN_COMPONENTS
