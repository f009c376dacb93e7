"""Loading pipeline.yaml (or a dict): override files, ``--set`` overrides, validation,
one-line errors (reading the YAML itself: config.yaml_files)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kaggle_tta.config.errors import ConfigError, did_you_mean
from kaggle_tta.config.pipeline import PipelineConfig
from kaggle_tta.config.yaml_files import parse_yaml, read_text_file, read_yaml_file

# ---- validation ------------------------------------------------------------------------------


def _format_loc(loc: tuple[Any, ...], raw: Any) -> str:
    """('members', 1, 'tta') -> 'members[1].tta', using the member's name where known."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(
            ("str", "list", "dict", "int", "float", "bool", "literal", "union", "tagged")
        ):
            continue  # pydantic's union branch labels: not YAML keys
        else:
            out += f".{part}" if out else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "pipeline"


def format_validation_error(
    err: ValidationError, raw: Any, source: str, origins: dict[tuple[Any, ...], str] | None = None
) -> str:
    """One line per problem: 'pipeline.yaml: members[0].tta: ... '; a problem at a value an
    override file set (``origins``: YAML location -> file, see :func:`merge_override_file`)
    says so: '... (set by tuned.yaml)'."""
    msgs = []
    seen = set()
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]), raw) + _origin(tuple(e["loc"]), origins)
        if e["type"] == "extra_forbidden":
            key = e["loc"][-1]
            parent_loc = tuple(e["loc"][:-1])
            model = _model_at(parent_loc)
            hint = did_you_mean(str(key), model.model_fields) if model else ""
            text = f"{_format_loc(parent_loc, raw)}{_origin(tuple(e['loc']), origins)}: unknown key '{key}'{hint}"
        else:
            text = f"{loc}: {e['msg'].removeprefix('Value error, ')}"
        if text not in seen:
            seen.add(text)
            msgs.append(text)
    return f"{source}: " + "; ".join(msgs[:5]) + (f" (and {len(msgs) - 5} more)" if len(msgs) > 5 else "")


def _origin(loc: tuple[Any, ...], origins: dict[tuple[Any, ...], str] | None) -> str:
    """' (set by FILE)' when an override file set the value at ``loc`` or a block above it."""
    if not origins:
        return ""
    keys = tuple(p for p in loc if isinstance(p, int) or p in _yaml_keys(origins))
    for n in range(len(keys), 0, -1):
        if keys[:n] in origins:
            return f" (set by {origins[keys[:n]]})"
    return ""


def _yaml_keys(origins: dict[tuple[Any, ...], str]) -> set[Any]:
    return {p for loc in origins for p in loc}


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
    name (``members.effb0.tta=d4``). The value is parsed as YAML (``[1, 2]``, ``true``, ``0.5``);
    text starting with ``{`` that is no YAML (a template, ``{label} {conf:.4f} ...``) is taken as it is.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key.path=value")
    key, _, value_text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment}: empty key")
    try:
        value = parse_yaml(value_text, f"--set {assignment}: value")
    except ConfigError:
        if not value_text.lstrip().startswith("{"):
            raise
        value = value_text  # a str.format template ('{label} {conf} ...') is no YAML mapping: taken as text
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


# ---- override files (--overrides FILE) ----------------------------------------------------

# Top-level lists whose items are merged by their name, not by their index.
NAMED_LISTS = {"members": "member", "blends": "blend"}


def merge_override_file(
    raw: dict[str, Any], path: Path | str, origins: dict[tuple[Any, ...], str] | None = None
) -> dict[tuple[Any, ...], str]:
    """Deep-merges a partial pipeline YAML (``kaggle-tta tune``'s tuned.yaml, or one written
    by hand) over the raw pipeline mapping, in place.

    Mappings merge key by key; ``members`` and ``blends`` items merge into the pipeline's
    item of the same ``name`` (an override adjusts them, it cannot add one: an unknown name
    is an error, with a did-you-mean); any other value, lists included (``tta``, ``weights``,
    ``view_weights``), replaces the pipeline's. ``null`` sets null. The file is read with the
    same safe loader as the pipeline.

    Returns:
        ``origins``, updated: the YAML location (``('members', 0, 'tta')``) of every value the
        file set, mapped to the file's name, so that validation errors can name it.

    Raises:
        ConfigError: the file is unreadable or not YAML, not a mapping, or names an item that
            does not exist; the message names the file and the YAML path.
    """
    where = str(path)
    over = read_yaml_file(Path(path), "override file")
    if over is None:
        over = {}
    if not isinstance(over, dict):
        raise ConfigError(
            f"{where}: expected a mapping at the top level (a partial pipeline: members, blends, submission, "
            f"...), got {type(over).__name__}"
        )
    origins = {} if origins is None else origins
    _merge(raw, over, (), where, origins)
    return origins


def _merge(
    base: dict[str, Any], over: dict[str, Any], loc: tuple[Any, ...], where: str, origins: dict[tuple[Any, ...], str]
) -> None:
    for key, value in over.items():
        here = (*loc, key)
        if not loc and key in NAMED_LISTS:
            _merge_named(base, key, value, where, origins)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, here, where, origins)
        else:
            base[key] = copy.deepcopy(value)
            origins[here] = where


def _merge_named(base: dict[str, Any], key: str, items: Any, where: str, origins: dict[tuple[Any, ...], str]) -> None:
    """``members`` / ``blends`` of an override file merged by name into the pipeline's."""
    kind = NAMED_LISTS[key]
    if not isinstance(items, list):
        raise ConfigError(f"{where}: {key}: give a list of {kind}s by name (- name: ...), got {type(items).__name__}")
    current = base.get(key)
    have: list[Any] = current if isinstance(current, list) else []
    names = [m.get("name") if isinstance(m, dict) else None for m in have]
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: {key}[{i}]: each item needs a 'name', the {kind} of the pipeline it adjusts")
        name = item["name"]
        if name not in names:
            known = [n for n in names if isinstance(n, str)]
            raise ConfigError(
                f"{where}: {key}[{i}].name: no {kind} named '{name}' in the pipeline{did_you_mean(name, known)}; "
                f"an override file adjusts the pipeline's {key} by name (add new ones to the pipeline itself)"
            )
        idx = names.index(name)
        _merge(have[idx], {k: v for k, v in item.items() if k != "name"}, (key, idx), where, origins)


def load_pipeline(
    source: Path | str | dict[str, Any],
    overrides: list[str] | None = None,
    base_dir: Path | str | None = None,
    override_files: Sequence[Path | str] | None = None,
) -> PipelineConfig:
    """Reads, overrides and validates a pipeline.

    Args:
        source: pipeline.yaml's path, or the same content as a mapping (a notebook's dict).
        overrides: ``key.path=value`` strings applied before validation, after the files.
        base_dir: what relative paths resolve against; default: the YAML's folder, or the
            working directory for a mapping (also for paths an override file sets).
        override_files: partial pipeline YAMLs deep-merged over it in order
            (:func:`merge_override_file`), before ``overrides``.

    Raises:
        ConfigError: a file is missing or not YAML, or a field is invalid (the message names
            the YAML path of each problem, and the override file that set it).
    """
    if isinstance(source, dict):
        raw, where, folder = copy.deepcopy(source), "pipeline", Path.cwd()
    else:
        path = Path(source)
        raw = read_yaml_file(path, "pipeline file")
        where, folder = str(path), path.resolve().parent
    if raw is None:
        raise ConfigError(f"{where}: the file is empty; write the pipeline in it (task, data, members, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level (task, data, members, ...)")
    origins: dict[tuple[Any, ...], str] = {}
    for f in override_files or []:
        merge_override_file(raw, f, origins)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw, where, origins)) from None
    cfg.base_dir = Path(base_dir).resolve() if base_dir is not None else folder
    cfg.source = None if isinstance(source, dict) else Path(source).resolve()
    check_output_paths(cfg, where)
    return cfg


def check_output_paths(cfg: PipelineConfig, where: str = "pipeline") -> None:
    """Refuses, before any work, outputs that cannot be written where they are set: a cache
    folder that is a file, a submission path that is a folder, either below a file.

    Whether a location is writable is left to the write itself: a pipeline is also loaded on
    machines that only bundle it (``kaggle-tta kernel``), where its outputs do not exist yet.
    """
    cache_dir = cfg.resolve(cfg.cache.dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(
            f"{where}: cache.dir: {cache_dir} is a file, not a folder; point cache.dir at a folder (or move the file)"
        )
    _check_parents(cache_dir, "cache.dir", where)
    sub = cfg.resolve(cfg.submission.path)
    if sub.is_dir():
        raise ConfigError(
            f"{where}: submission.path: {sub} is a folder; give a file path, e.g. {sub / 'submission.csv'}"
        )
    _check_parents(sub, "submission.path", where)


def _check_parents(path: Path, key: str, where: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{where}: {key}: {parent} is a file, so {path} cannot be created below it; fix {key}"
                )
            return


def load_classes(cfg: PipelineConfig) -> list[str]:
    """The class names, from `data.classes` or `data.classes_file`."""
    if cfg.data.classes is not None:
        classes = list(cfg.data.classes)
    else:
        f = cfg.resolve(cfg.data.classes_file)  # type: ignore[arg-type]
        if not f.exists():
            raise ConfigError(f"data.classes_file: {f} does not exist")
        try:
            text = read_text_file(f, "class list")
        except ConfigError as exc:
            raise ConfigError(f"data.classes_file: {exc}") from None
        classes = [line.strip() for line in text.splitlines() if line.strip()]
    if not classes:
        raise ConfigError("data.classes: no class names given")
    if len(set(classes)) != len(classes):
        raise ConfigError("data.classes: a class name is repeated")
    return classes
