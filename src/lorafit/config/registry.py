"""The component registry: (component_key, variant_key) -> builder + pydantic config model.

A component module declares its config model and builder side by side and registers them in the same file:

    class LoraConfig(ComponentConfig):
        r: int = Field(ge=1)
        model: Component("model")

    @register_component("model", "lora", LoraConfig)
    def build_lora_model(config: LoraConfig) -> torch.nn.Module: ...

Config values that are components (inline `{component_key, variant_key, config}` blocks or
`{instance_key, pass_type}` references) reach the builder already built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict

from lorafit.config.strict_values import StrictValues
from lorafit.errors import did_you_mean


class ComponentConfig(StrictValues):
    """Base class of every component's config: unknown keys are errors, built objects are allowed."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())
    # set by a model component that converts or re-draws the weights it is given: why it needs them whole before
    # sharding (so an fsdp2 run loads them before sharding instead of building on the meta device; run/build.py)
    needs_whole_weights: ClassVar[str | None] = None


class Pending:
    """Stands in for a component while a config is validated without building anything.

    `known=False` marks a stand-in whose kind is unknown (a missing reference, an unknown component_key): that
    problem is reported where it is, so a field expecting some kind of component does not report it again.
    """

    def __init__(
        self, component_key: str, variant_key: str, path: str, *, known: bool = True, refers_to: str | None = None
    ):
        self.component_key = component_key
        self.variant_key = variant_key
        self.path = path
        self.known = known
        self.config: Any = None  # the checked config model (its component fields Pending too), when it validated
        self.refers_to = refers_to  # a reference's stand-in: the top-level entity it names (aliases followed)

    def __repr__(self) -> str:
        return f"<{self.component_key}/{self.variant_key} at {self.path}>"


_PLAIN = (str, int, float, bool, dict, list, tuple, type(None))


@dataclass(frozen=True)
class ComponentMarker:
    """Marks a config field as holding components of `keys` (read by docs and `lorafit components`)."""

    keys: tuple[str, ...]


def Component(*component_keys: str) -> Any:  # noqa: N802 - reads as a type in config models
    """Type for a config field that must hold a built component of one of `component_keys`."""
    wanted = " or ".join(f"'{k}'" for k in component_keys)

    def check(value: Any) -> Any:
        if isinstance(value, Pending):
            if value.known and value.component_key not in component_keys:
                raise ValueError(
                    f"expected a {wanted} component, got '{value.component_key}/{value.variant_key}' ({value.path})"
                )
            return value
        if isinstance(value, _PLAIN):
            raise ValueError(
                f"expected a {wanted} component: an inline {{component_key, variant_key, config}} block "
                f"or a reference {{instance_key: NAME, pass_type: BY_REFERENCE}}, got {type(value).__name__} {value!r}"
            )
        return value

    return Annotated[Any, BeforeValidator(check), ComponentMarker(component_keys)]


@dataclass(frozen=True)
class ComponentSpec:
    component_key: str
    variant_key: str
    config_model: type[BaseModel]
    builder: Callable[[Any], Any]

    @property
    def doc(self) -> str:
        text = (self.builder.__doc__ or self.config_model.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""


class Registry:
    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], ComponentSpec] = {}

    def register(self, component_key: str, variant_key: str, config_model: type[BaseModel]):
        def decorator(builder: Callable[[Any], Any]):
            key = (component_key, variant_key)
            if key in self._specs and self._specs[key].builder is not builder:
                raise ValueError(f"component {component_key}/{variant_key} is already registered")
            self._specs[key] = ComponentSpec(component_key, variant_key, config_model, builder)
            return builder

        return decorator

    def component_keys(self) -> list[str]:
        return sorted({ck for ck, _ in self._specs})

    def variant_keys(self, component_key: str) -> list[str]:
        return sorted(vk for ck, vk in self._specs if ck == component_key)

    def has(self, component_key: Any, variant_key: Any) -> bool:
        return (component_key, variant_key) in self._specs

    def get(self, component_key: str, variant_key: str) -> ComponentSpec:
        """The spec, or a ValueError whose message lists the valid choices and the nearest one."""
        if (component_key, variant_key) in self._specs:
            return self._specs[(component_key, variant_key)]
        keys = self.component_keys()
        if component_key not in keys:
            raise LookupError(
                "component_key",
                f"unknown component_key '{component_key}'{did_you_mean(component_key, keys)}; valid: {', '.join(keys)}",
            )
        variants = self.variant_keys(component_key)
        raise LookupError(
            "variant_key",
            f"unknown variant_key '{variant_key}' for component_key '{component_key}'"
            f"{did_you_mean(variant_key, variants)}; valid: {', '.join(variants)}",
        )

    def specs(self) -> list[ComponentSpec]:
        return [self._specs[k] for k in sorted(self._specs)]


REGISTRY = Registry()


def register_component(component_key: str, variant_key: str, config_model: type[BaseModel]):
    """Public API: register a builder for (component_key, variant_key) with its pydantic config model."""
    return REGISTRY.register(component_key, variant_key, config_model)
