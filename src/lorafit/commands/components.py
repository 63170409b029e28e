"""`lorafit components [COMPONENT_KEY]`: every registered component with its config fields."""

from __future__ import annotations

import argparse

from lorafit.errors import UserError, did_you_mean


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("components", help="list registered components and their config fields")
    parser.add_argument("component_key", nargs="?", help="only this component_key")
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
    print(describe_components(REGISTRY, args.component_key))
    return 0
