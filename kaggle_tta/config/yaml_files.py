"""Reading YAML safely: a file's text and content, with every way it can be unreadable, a
YAML error, a duplicate key or an alias bomb as one ConfigError line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kaggle_tta.config.errors import ConfigError

# Aliases may reuse anchored blocks (a shared ``preprocess: &p {...}``), but each level of
# aliases to aliases multiplies what they stand for: 966 bytes of them once expanded to 10^8
# nodes (75 s and 11 GB in validation). A real pipeline's aliases add hundreds of nodes.
MAX_ALIAS_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


# ---- reading YAML ----------------------------------------------------------------------------


def read_yaml_file(path: Path, what: str = "file") -> Any:
    """A YAML file's content, with every way it can be unreadable as one ConfigError line.

    ``what`` names the file in the not-found message (``pipeline file``). Refused: a missing
    path or a folder, an unreadable file, bytes that are not UTF-8, invalid YAML, duplicate
    keys, recursive anchors and aliases that expand past :data:`MAX_ALIAS_NODES` nodes.
    """
    return parse_yaml(read_text_file(path, what), str(path))


def read_text_file(path: Path, what: str = "file") -> str:
    """A UTF-8 text file's content; a folder, a missing or unreadable file, or bytes that are
    not UTF-8 are a ConfigError naming the path (and the line of the first bad byte)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}; pass the path of the file itself")
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such {what}; pass the path of your pipeline.yaml"
            if what == "pipeline file"
            else f"{path}: no such {what}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from None


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the checks of :func:`read_yaml_file`; errors start with ``where``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, loader, where)
        _names_as_written(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


NAME_LISTS = (("data", "classes"), ("submission", "class_columns"))
"""Lists of names, each taken as its text: ``[0, 1, 2]`` (APTOS' grades), ``[010, 011]`` (not
YAML 1.1's octal 8, 9), ``[no, yes]`` (not booleans)."""


def _names_as_written(root: yaml.Node) -> None:
    """The scalars of :data:`NAME_LISTS` as strings, whatever YAML would resolve them to."""
    for section, key in NAME_LISTS:
        node = _value(_value(root, section), key)
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                if isinstance(item, yaml.ScalarNode) and item.tag != "tag:yaml.org,2002:null":
                    item.tag = "tag:yaml.org,2002:str"


def _value(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong and where (its own message spans several lines)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_nodes(root: yaml.Node, loader: yaml.SafeLoader, where: str) -> None:
    """Refuses duplicate keys, recursive anchors and alias bombs in a composed document.

    An alias is the same node object reached again, so each node's expanded size (itself
    and everything below, aliases counted each time) is memoized: the walk visits every
    distinct node once however much the aliases would expand, iteratively (no recursion).
    """
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # started, not finished: the current path from the root
    distinct = 0
    stack: list[tuple[yaml.Node, str, bool]] = [(root, "", False)]
    while stack:
        node, loc, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for _, child in _children(node))
            if size[key] > distinct + MAX_ALIAS_NODES:
                raise ConfigError(
                    f"{where}: YAML aliases expand to more than {MAX_ALIAS_NODES} nodes (line "
                    f"{node.start_mark.line + 1}, "
                    f"{loc or 'the top level'}); write the values out or use fewer aliases"
                )
            continue
        if key in size:
            continue  # an alias of a node already checked
        if key in open_nodes:
            raise ConfigError(
                f"{where}: line {node.start_mark.line + 1}: {loc or 'the top level'} is an alias of a block that "
                "contains it "
                "(a recursive anchor); a value cannot contain itself"
            )
        distinct += 1
        open_nodes.add(key)
        stack.append((node, loc, True))
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, loader, loc, where)
        stack.extend((child, child_loc, False) for child_loc, child in reversed(_children(node, loc)))


def _children(node: yaml.Node, loc: str = "") -> list[tuple[str, yaml.Node]]:
    """(YAML path, node) of a node's keys and values, or its items."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"{loc}[{i}]", item) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = []
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            sub = f"{loc}.{name}" if loc else str(name)
            out += [(sub, k), (sub, v)]
        return out
    return []


def _check_duplicate_keys(node: yaml.MappingNode, loader: yaml.SafeLoader, loc: str, where: str) -> None:
    """A key given twice in one mapping (YAML would keep the last one silently)."""
    first: dict[Any, int] = {}
    for k, _ in node.value:
        if not isinstance(k, yaml.ScalarNode) or k.tag == _MERGE_TAG:
            continue  # '<<: *base' merges: explicit keys override merged ones by design
        try:  # 'true' and 'True', '1' and '0x1' are one key once constructed
            name = k.value if k.tag == "tag:yaml.org,2002:str" else loader.construct_object(k)
            hash(name)
        except (yaml.YAMLError, TypeError):
            name = (k.tag, k.value)
        line = k.start_mark.line + 1
        if name in first:
            path = f"{loc}.{k.value}" if loc else k.value
            raise ConfigError(f"{where}: line {line}: {path} is given twice (first on line {first[name]}); keep one")
        first[name] = line
