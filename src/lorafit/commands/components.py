"""`lorafit components [COMPONENT_KEY]`: every registered component with its config fields."""

from __future__ import annotations

import argparse

from lorafit.errors import UserError, did_you_mean


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("components", help="list registered components and their config fields")
    parser.add_argument("component_key", nargs="?", help="only this component_key")
    parser.add_argument(
        "--modalities",
        action="store_true",
        help="the fields of the components that read Modalities configs too (listed by name only otherwise)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.components import load_builtin_components
    from lorafit.config.describe import describe_components
    from lorafit.config.registry import REGISTRY

    load_builtin_components()
    keys = REGISTRY.component_keys()
    if args.component_key and args.component_key not in keys:
        raise UserError(
            f"unknown component_key '{args.component_key}'{did_you_mean(args.component_key, keys)}; "
            f"valid: {', '.join(keys)}"
        )
    native = describe_components(REGISTRY, args.component_key, where=lambda spec: not _from_modalities(spec))
    modalities = describe_components(
        REGISTRY, args.component_key, where=_from_modalities, fields=args.modalities or bool(args.component_key)
    )
    print(native.rstrip() if native.strip() else f"no native {args.component_key} component")
    if modalities.strip():
        more = "" if args.modalities or args.component_key else "; `lorafit components --modalities` shows their fields"
        print(
            f"\n# Modalities compatibility: the components Modalities configs name, with Modalities' meaning "
            f"(docs/modalities.md){more}\n"
        )
        print(modalities.rstrip())
    return 0


def _from_modalities(spec) -> bool:
    """Presentation only: the components lorafit.modalities defines are listed after lorafit's own."""
    return spec.builder.__module__.startswith("lorafit.modalities")
