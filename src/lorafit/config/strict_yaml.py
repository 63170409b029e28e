"""YAML parsing that a hostile config cannot turn into a hang, a crash or a silent surprise.

`yaml.safe_load` already refuses Python tags. On top of it, before any Python object is built:

- a document nested deeper than MAX_DEPTH levels is refused (PyYAML's composer, OmegaConf and the graph builder
  all recurse once per level: 5,000 levels end in a RecursionError traceback);
- a document that expands, through its aliases (`*name`), to more than MAX_VALUES values is refused: an alias
  bomb (9 levels of 9 aliases each is 387 million values) costs PyYAML nothing, since aliases share one node,
  but OmegaConf copies every one, which takes hours and all memory. A recursive alias (`&a [*a]`) is refused too;
- a key given twice in one mapping is an error naming both lines (YAML says keys are unique; PyYAML lets the
  last one win silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lorafit.errors import ConfigError

MAX_DEPTH = 48  # real configs nest fewer than 15; OmegaConf overflows the stack near 100
MAX_VALUES = 100_000  # real configs hold hundreds; counted with every alias expanded
MAX_BYTES = 10 * 2**20
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose composer stops at MAX_DEPTH levels instead of overflowing Python's stack."""

    def __init__(self, stream: str, path: Path):
        super().__init__(stream)
        self.source = path
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{self.source}: line {mark.line + 1}: the document is nested more than {MAX_DEPTH} "
                    "levels deep; a config needs far fewer"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str, path: Path) -> Any:
    """Parse one YAML document with the limits above; yaml.YAMLError for syntax, ConfigError for the rest."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(f"{path}: the file is larger than {MAX_BYTES // 2**20} MiB; a config is a few KiB")
    loader = _StrictLoader(text, path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path)
        _check_duplicate_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node, path: Path) -> None:
    """Count values and depth with every alias expanded, without expanding: each distinct node once (iteratively,
    so that a long chain of aliases cannot overflow the stack here either)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    aliased = False  # whether any node is reached twice: only an alias shares a node
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            on_path.discard(key)
            if size[key] > MAX_VALUES:
                if aliased:
                    raise ConfigError(
                        f"{path}: line {_line(node)}: this value expands to more than {MAX_VALUES:,} "
                        "values through aliases (*name): refused"
                    )
                raise ConfigError(
                    f"{path}: line {_line(node)}: too many values (more than {MAX_VALUES:,}; a run "
                    "config holds hundreds): refused"
                )
            if depth[key] > MAX_DEPTH:
                raise ConfigError(
                    f"{path}: line {_line(node)}: this value nests more than {MAX_DEPTH} levels deep "
                    "once its aliases (*name) are expanded"
                )
            continue
        if key in size:
            aliased = True
            continue
        if key in on_path:
            raise ConfigError(f"{path}: line {_line(node)}: a recursive alias (an anchor used inside itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


def _check_duplicate_keys(root: Node, path: Path) -> None:
    seen: set[int] = set()
    stack: list[tuple[Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, MappingNode):
            first: dict[tuple[str, str], ScalarNode] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                label = f"{where}.{key_node.value}" if where else key_node.value
                earlier = first.setdefault((key_node.tag, key_node.value), key_node)
                if earlier is not key_node:
                    raise ConfigError(
                        f"{path}: {label}: the key '{key_node.value}' is given twice, at line "
                        f"{_line(earlier)} and line {_line(key_node)}; keep one"
                    )
                stack.append((value_node, label))
