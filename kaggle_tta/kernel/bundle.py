"""The files a pipeline references: where each goes in the dataset, and the YAML rewritten to match.

The schema marks every path field with a ``config.Bundle`` (its role and kind); the collector
walks those marks (``config.bundled_fields``) and hands each one to its role's handler, which
ships the file and returns the path the rewritten YAML holds at the same place. Adding a path
field to the schema with a mark is all it takes for it to be bundled.

- ``member``: a member's own file (checkpoint, albumentations file, a factory's path kwargs)
  goes flat at the dataset's top level.
- ``code``: a factory member's module: a dependency wheel when a distribution provides it, else
  its source under ``code/``.
- ``data``: test data and ground truth are read from the competition's folder (when under
  --data-root or /kaggle/input) or, without a competition, shipped under ``data/``.
- ``classes``: the class list is read from the competition's folder when it lies there, else
  shipped flat.
- ``output``: ``cache.dir`` and ``submission.path`` point at their ``kaggle`` path under
  /kaggle/working (the notebook sets them again from the working folder it finds).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kaggle_tta.config.errors import CheckpointError
from kaggle_tta.io.zips import is_archive
from kaggle_tta.kernel.options import MANIFEST, KernelError, KernelOptions

if TYPE_CHECKING:
    from kaggle_tta.config import Bundle, PipelineConfig

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Marked:
    """A value to bundle: its YAML path (member indexes as in ``cfg.members``), value and mark."""

    loc: Loc
    value: Any
    mark: Bundle
    default_of: Loc | None = None
    """For a ``csv-root`` left unset: the CSV whose folder it defaults to (not in the YAML)."""


def list_marked(cfg: PipelineConfig) -> list[Marked]:
    """Everything to bundle, in the order it is bundled (which decides the names two files of
    one name get): member by member, its marked fields, then its factory's path kwargs
    (``MemberConfig.path_kwargs``), then its factory's module; then the other fields by role,
    in ``Collector.ROLES`` order, each in schema order.

    A ``csv-root`` field left unset is listed right after its section's file, as that file's
    folder (``data.csv.root`` defaults to the CSV's folder).
    """
    from kaggle_tta.config import Bundle, bundled_fields

    members: list[list[Marked]] = [[] for _ in cfg.members]
    rest: list[Marked] = []
    for loc, value, mark in bundled_fields(cfg):
        entries = [Marked(loc, value, mark), *(_unset_roots(cfg, loc, value) if mark.kind == "file" else [])]
        (members[loc[1]] if loc[0] == "members" else rest).extend(entries)  # type: ignore[index]
    for i, m in enumerate(cfg.members):
        members[i] += [Marked(("members", i, "kwargs", k), v, Bundle("member")) for k, v in m.path_kwargs().items()]
        if m.factory is not None:
            members[i].append(Marked(("members", i, "factory"), m.factory, Bundle("code")))
    order = list(Collector.ROLES)
    rest.sort(
        key=lambda e: order.index(e.mark.role) if e.mark.role in order else len(order)
    )  # stable: schema order within a role
    return [e for entries in members for e in entries] + rest


def _unset_roots(cfg: PipelineConfig, loc: Loc, value: Any) -> list[Marked]:
    """The unset ``csv-root`` fields of the section holding the file at ``loc``."""
    from kaggle_tta.config import Bundle

    section: Any = cfg
    for part in loc[:-1]:
        section = section[part] if isinstance(part, int) else getattr(section, part)
    out = []
    for name, f in type(section).model_fields.items():
        mark = next((m for m in f.metadata if isinstance(m, Bundle)), None)
        if mark is not None and mark.kind == "csv-root" and getattr(section, name) is None:
            out.append(Marked((*loc[:-1], name), cfg.resolve(value).parent, mark, default_of=loc))
    return out


def format_key(cfg: PipelineConfig, loc: Loc) -> str:
    """('members', 1, 'checkpoint') -> 'members.effnet.checkpoint': the form ``--set`` takes."""
    parts: list[Any] = []
    node: Any = cfg
    for part in loc:
        node = node[part] if isinstance(part, int) else getattr(node, str(part), None)
        parts.append(getattr(node, "name", part) if isinstance(part, int) else part)
    return ".".join(map(str, parts))


def _get(raw: Any, loc: Loc) -> Any:
    for part in loc:
        raw = raw[part]
    return raw


def _put(raw: dict[str, Any], loc: Loc, value: Any) -> None:
    """Sets ``value`` at ``loc`` in the raw YAML, making the sections a default left out."""
    node: Any = raw
    for part in loc[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[loc[-1]] = value


def collect_files(cfg: PipelineConfig, raw: dict[str, Any], opts: KernelOptions, source: Path) -> Collector:
    """Decides where each file ``cfg`` references goes and rewrites (a copy of) ``raw`` to match.

    Args:
        cfg: The validated pipeline, with ``opts.overrides`` applied.
        raw: The same pipeline as the YAML mapping, overrides applied too.
        opts: The build's options (competition, --data-root, --bundle-data, owner).
        source: pipeline.yaml's path: names the rewritten file.

    Raises:
        KaggleTTAError: a referenced file is missing or cannot be bundled.
    """
    from kaggle_tta.io.needs import reader_needs

    col = Collector(cfg, raw, opts, source)
    col.collect()
    for name, key in reader_needs(cfg).items():  # a reader's wheels, only where the pipeline reads its files
        col.distributions.setdefault(name, key)
    return col


class Collector:
    """What goes into the dataset: ``files`` (flat), ``trees`` (folders copied whole),
    ``tree_files`` (files under a sub-folder), and ``raw``, the YAML rewritten to match."""

    def __init__(self, cfg: PipelineConfig, raw: dict[str, Any], opts: KernelOptions, source: Path):
        self.cfg, self.raw, self.opts, self.source = cfg, copy.deepcopy(raw), opts, source
        self.pipeline_name = source.name if source.suffix in (".yaml", ".yml") else "pipeline.yaml"
        self.files: dict[str, Path] = {}  # dataset name -> source file
        self.trees: dict[str, Path] = {}  # dataset sub-folder -> source folder (copied whole)
        self.tree_files: dict[str, Path] = {}  # dataset path under a sub-folder -> source file
        self.competition_paths: list[dict[str, Any]] = []
        self.bundled_paths: list[dict[str, str]] = []  # YAML keys pointing into data/ or code/
        self.distributions: dict[str, str] = {}  # installed distribution -> the factory needing it
        self.model_sources: list[str] = []  # Kaggle Models the members' checkpoints are in
        self.code_modules: list[str] = []
        self.owner = opts.owner or os.environ.get("KAGGLE_USERNAME") or "your-kaggle-username"
        self.owner_placeholder = not (opts.owner or os.environ.get("KAGGLE_USERNAME"))
        self._taken = {MANIFEST, "dataset-metadata.json", self.pipeline_name, "data", "code"}

    def collect(self) -> None:
        """Bundles every marked value (see list_marked) and rewrites ``raw`` where it lies."""
        for e in list_marked(self.cfg):
            key = format_key(self.cfg, e.loc)
            if e.mark.role not in self.ROLES:
                raise KernelError(
                    f"{key}: the schema marks it with role '{e.mark.role}', which the bundle has no handler for; "
                    f"use one of {', '.join(self.ROLES)}"
                )
            new = self.ROLES[e.mark.role](self, e, key)
            if new is not None:
                _put(self.raw, e.loc, new)

    # -- the role handlers

    def _member(self, e: Marked, key: str) -> str | None:
        if not isinstance(e.value, (str, Path)):
            return None  # inline content (an albumentations pipeline as a mapping): nothing to ship
        model = self.cfg.members[e.loc[1]].kaggle_model if e.loc[-1] == "checkpoint" else None  # type: ignore[index]
        if model is not None:  # a Kaggle Model: mounted by model_sources, no copy in the dataset
            self.cfg.checkpoint_of(self.cfg.members[e.loc[1]])  # type: ignore[index]  # found here, or one line
            if model not in self.model_sources:
                self.model_sources.append(model)
            return None
        path = self.cfg.resolve(e.value)
        if e.loc[-1] == "checkpoint" and not path.is_file():  # the demo's weights are made, not checked in: say how
            raise CheckpointError(
                f"{key}: {path} not found; fix the path (for the demo: make demo-weights) before bundling"
            )
        return self._flat(self._existing(path, key), self.cfg.members[e.loc[1]].name)  # type: ignore[index]

    def _code(self, e: Marked, key: str) -> None:
        top = e.value.partition(":")[0].split(".")[0]
        if top == "kaggle_tta":
            return
        src = _find_module(top, key)
        if isinstance(src, str):  # a distribution provides it: bundled as a wheel
            self.distributions.setdefault(src, key)
            return
        dest = f"code/{src.name}"
        if dest not in self.trees and dest not in self.tree_files:
            (self.trees if src.is_dir() else self.tree_files)[dest] = src
            self.code_modules.append(top)

    def _data(self, e: Marked, key: str) -> str | None:
        if e.default_of is not None and str(_get(self.raw, e.default_of)).startswith("/kaggle/"):
            return None  # the CSV is read on Kaggle: its folder is the default root there too
        return self._data_path(key, self.cfg.resolve(e.value), e.mark.kind, e.mark.optional)

    def _classes(self, e: Marked, key: str) -> str:
        path = self.cfg.resolve(e.value)
        rel = _competition_relpath(path, self.opts)
        if rel is not None:
            return self._competition(key, rel, e.mark.kind, e.mark.optional)
        return self._flat(self._existing(path, key), e.mark.role)

    def _output(self, e: Marked, key: str) -> str:
        if e.mark.kaggle is None:
            raise KernelError(
                f"{key}: the schema marks it as an output without its /kaggle/working path; give the mark a "
                "'kaggle' path"
            )
        return e.mark.kaggle

    # role -> its handler: ships one marked value and returns what the YAML holds there (None:
    # unchanged). Listed in bundling order (list_marked).
    ROLES: ClassVar[dict[str, Callable[[Collector, Marked, str], str | None]]] = {
        "member": _member,
        "code": _code,
        "data": _data,
        "classes": _classes,
        "output": _output,
    }

    # -- names and files

    def _existing(self, path: Path, where: str) -> Path:
        if not path.is_file():
            raise KernelError(f"{where}: {path} is not a file, so it cannot be bundled; fix the path")
        return path

    def _name(self, name: str, prefix: str) -> str:
        if name in self._taken:
            name = f"{prefix}__{name}"
        n, stem = 2, name
        while name in self._taken:
            name, n = f"{n}__{stem}", n + 1
        self._taken.add(name)
        return name

    def _flat(self, path: Path, prefix: str) -> str:
        """Bundles one file at the top level; the same source file is bundled once."""
        for name, src in self.files.items():
            if src == path.resolve():
                return name
        name = self._name(path.name, prefix)
        self.files[name] = path.resolve()
        return name

    # -- data

    def _competition(self, key: str, rel: str, kind: str, optional: bool = False) -> str:
        self.competition_paths.append({"key": key, "path": rel, "kind": kind, "optional": optional})
        return f"/kaggle/input/{self.opts.competition}/{rel}"

    def _data_path(self, key: str, path: Path, kind: str, optional: bool = False) -> str:
        if kind in ("dir", "csv-root") and is_archive(path):  # a test set in an archive (io.zips): the file
            kind = "file"
        rel = _competition_relpath(path, self.opts)
        if rel is not None:
            return self._competition(key, rel, "dir" if kind == "csv-root" else kind, optional)
        if self.opts.competition is not None and not self.opts.bundle_data:
            where = (
                f"it is not under --data-root {self.opts.data_root}"
                if self.opts.data_root
                else "no --data-root says where the competition data lies here"
            )
            raise KernelError(
                f"{key}: {path}: with --competition the test data is read from the competition's folder on "
                f"Kaggle, but {where}; "
                "give --data-root (your local copy of the competition data), or --bundle-data to ship this data "
                "in the dataset"
            )
        shippers = {
            "glob": self._bundle_glob,
            "dir": self._bundle_dir,
            "csv-root": self._bundle_dir,
            "file": self._bundle_file,
        }
        if kind not in shippers:
            raise KernelError(
                f"{key}: the schema marks it with kind '{kind}', which the bundle cannot ship; use one of "
                f"{', '.join(shippers)}"
            )
        return shippers[kind](key, path, kind)

    def _bundle_glob(self, key: str, path: Path, kind: str) -> str:
        import glob as globlib

        base, rest = _split_glob(path)
        files = [Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file()]
        if not files:
            raise KernelError(f"{key}: {path} matches no file, so there is nothing to bundle; {_FIX}")
        dest = self._data_dir(base.name or "test")
        for f in files:
            self.tree_files[f"{dest}/{f.relative_to(base).as_posix()}"] = f
        return self._bundled(key, f"{dest}/{rest}")

    def _bundle_dir(self, key: str, path: Path, kind: str) -> str:
        if not path.is_dir():
            raise KernelError(f"{key}: {path} is not a folder, so it cannot be bundled; {_FIX}")
        for dest, src in self.trees.items():
            if src == path.resolve():
                return self._bundled(key, dest)
        if kind == "csv-root":  # only the images the CSV lists, not the whole folder
            return self._bundle_csv_root(key, path)
        dest = self._data_dir(path.name)
        self.trees[dest] = path.resolve()
        return self._bundled(key, dest)

    def _bundle_file(self, key: str, path: Path, kind: str) -> str:
        if not path.is_file():
            raise KernelError(f"{key}: {path} is not a file, so it cannot be bundled; {_FIX}")
        for dest, src in self.trees.items():  # a file inside a bundled folder (labels.csv in the test folder)
            if src in path.resolve().parents:
                return self._bundled(key, f"{dest}/{path.resolve().relative_to(src).as_posix()}")
        dest = f"data/{self._name(path.name, 'data')}"
        self.tree_files[dest] = path.resolve()
        return self._bundled(key, dest)

    def _bundle_csv_root(self, key: str, root: Path) -> str:
        from kaggle_tta.io.data import list_test_set

        dest = self._data_dir(root.name)
        for p in map(Path, list_test_set(self.cfg).paths):
            try:
                rel = p.resolve().relative_to(root.resolve())
            except ValueError:
                raise KernelError(
                    f"data.csv: {p} is outside {root}, so it cannot be bundled; list paths relative to data.csv.root"
                ) from None
            self.tree_files[f"{dest}/{rel.as_posix()}"] = p.resolve()
        return self._bundled(key, dest)

    def _data_dir(self, name: str) -> str:
        return f"data/{self._name(name or 'test', 'data')}"

    def _bundled(self, key: str, dest: str) -> str:
        self.bundled_paths.append({"key": key, "path": dest})
        return dest


_FIX = "create it first (for the demo: make demo-data) or fix the path"


def _competition_relpath(path: Path, opts: KernelOptions) -> str | None:
    """Where ``path`` lies in the competition's data (under /kaggle/input or --data-root), else None."""
    comp = opts.competition
    if comp is None:
        return None
    text = Path(os.path.normpath(str(path))).as_posix()
    for prefix in (f"/kaggle/input/competitions/{comp}", f"/kaggle/input/{comp}"):
        if text == prefix or text.startswith(prefix + "/"):
            return text[len(prefix) :].lstrip("/") or "."
    if opts.data_root is not None:
        for base, p in (
            (opts.data_root.resolve(), path.resolve()),
            (Path(os.path.abspath(opts.data_root)), Path(os.path.abspath(path))),
        ):
            if p == base or base in p.parents:
                return p.relative_to(base).as_posix() or "."
    return None


def _split_glob(path: Path) -> tuple[Path, str]:
    """A glob pattern as (the folder before its first wildcard, the pattern below it)."""
    import glob as globlib

    base = Path(path.anchor)
    parts = path.relative_to(base).parts
    for i, part in enumerate(parts):
        if globlib.has_magic(part):
            return base.joinpath(*parts[:i]), "/".join(parts[i:])
    return path.parent, path.name


def _find_module(top: str, key: str) -> str | Path:
    """A factory's top-level module: the name of the installed distribution providing it, else
    its source (the module's file or the package's folder)."""
    import importlib.metadata as md
    import importlib.util

    dists = md.packages_distributions().get(top)
    if dists:
        return dists[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        found = None
    if found is None or found.origin in (None, "built-in", "frozen"):
        raise KernelError(
            f"{key}: module '{top}' is not importable here, so it cannot be bundled; install it or fix the name"
        )
    src = Path(found.origin)
    return src.parent if found.submodule_search_locations else src
