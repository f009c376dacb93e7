"""Loading pipeline.yaml (or a dict): ``--set`` overrides, validation, one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kaggle_tta.config.pipeline import PipelineConfig
from kaggle_tta.errors import ConfigError, did_you_mean



def _format_loc(loc: tuple[Any, ...], raw: Any) -> str:
    """('members', 1, 'tta') -> 'members[1].tta', using the member's name where known."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("str", "list", "dict", "int", "float", "bool", "literal", "union", "tagged")):
            continue  # pydantic's union branch labels: not YAML keys
        else:
            out += f".{part}" if out else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "pipeline"


def format_validation_error(err: ValidationError, raw: Any, source: str) -> str:
    """One line per problem: 'pipeline.yaml: members[0].tta: ... '."""
    msgs = []
    seen = set()
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]), raw)
        if e["type"] == "extra_forbidden":
            key = e["loc"][-1]
            parent_loc = tuple(e["loc"][:-1])
            model = _model_at(parent_loc)
            hint = did_you_mean(str(key), model.model_fields) if model else ""
            text = f"{_format_loc(parent_loc, raw)}: unknown key '{key}'{hint}"
        else:
            text = f"{loc}: {e['msg'].removeprefix('Value error, ')}"
        if text not in seen:
            seen.add(text)
            msgs.append(text)
    return f"{source}: " + "; ".join(msgs[:5]) + (f" (and {len(msgs) - 5} more)" if len(msgs) > 5 else "")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found at a location, to suggest a key that exists."""
    model: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in (c, *getattr(c, "__args__", ())):
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Applies ``key.path=value`` to the raw YAML mapping, in place.

    Path parts address mappings by key and lists by index or, for members and blends, by
    name (``members.effb0.tta=d4``). The value is parsed as YAML (``[1, 2]``, ``true``, ``0.5``).
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key.path=value")
    key, _, value_text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment}: empty key")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment}: value is not valid YAML ({exc})") from None
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part)
            if idx is None:
                raise ConfigError(f"--set {assignment}: '{where}' matches no list item (use an index or a name)")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {assignment}: '{'.'.join(parts[:i])}' is not a mapping or list")


def _list_index(items: list[Any], part: str) -> int | None:
    if part.lstrip("-").isdigit():
        idx = int(part)
        return idx if -len(items) <= idx < len(items) else None
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    return None


def load_pipeline(source: Path | str | dict[str, Any], overrides: list[str] | None = None, base_dir: Path | str | None = None) -> PipelineConfig:
    """Reads, overrides and validates a pipeline.

    Args:
        source: pipeline.yaml's path, or the same content as a mapping (a notebook's dict).
        overrides: ``key.path=value`` strings applied before validation.
        base_dir: what relative paths resolve against; default: the YAML's folder, or the
            working directory for a mapping.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is invalid (the message names
            the YAML path of each problem).
    """
    if isinstance(source, dict):
        raw, where, folder = copy.deepcopy(source), "pipeline", Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: no such pipeline file; pass the path of your pipeline.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        where, folder = str(path), path.resolve().parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level (task, data, members, ...)")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw, where)) from None
    cfg.base_dir = Path(base_dir).resolve() if base_dir is not None else folder
    return cfg


def load_classes(cfg: PipelineConfig) -> list[str]:
    """The class names, from `data.classes` or `data.classes_file`."""
    if cfg.data.classes is not None:
        classes = list(cfg.data.classes)
    else:
        f = cfg.resolve(cfg.data.classes_file)  # type: ignore[arg-type]
        if not f.is_file():
            raise ConfigError(f"data.classes_file: {f} does not exist")
        classes = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classes:
        raise ConfigError("data.classes: no class names given")
    if len(set(classes)) != len(classes):
        raise ConfigError("data.classes: a class name is repeated")
    return classes
