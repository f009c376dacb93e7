"""The offline Kaggle bundle: ``kaggle-tta kernel PIPELINE --out DIR``.

Kaggle runs code-competition notebooks with the internet off, so everything a run needs must
come from attached inputs. This builds two folders, ready for the ``kaggle`` CLI:

- ``DIR/dataset``: a Kaggle dataset holding, flat at its top level, the wheels of kaggle_tta
  and of every dependency the Kaggle image lacks, the checkpoints and other files the pipeline
  references, the pipeline rewritten with paths relative to the dataset,
  ``kaggle_tta_bundle.json`` (what the notebook needs to know) and ``dataset-metadata.json``.
  Test data is bundled (under ``data/``) only when there is no competition to read it from.
- ``DIR/kernel``: the notebook ``kernels/kaggle_tta_inference.ipynb`` with its parameters cell
  filled in, and ``kernel-metadata.json`` with ``enable_internet: false`` written out
  (Kaggle's API turns the internet on when the key is absent).

Everything is checked, and every wheel found or fetched, before DIR is touched: a missing
checkpoint, a file that cannot be bundled or a dependency without a wheel raises a
KaggleTTAError naming it and leaves no half-built bundle. Nothing is uploaded; the only network
use is pip asking the package index for wheels missing from the wheel cache.

The dependency wheels are the versions installed here (the environment the pipeline was tested
in): the installed metadata is walked from kaggle_tta's requirements, without descending into
the excluded packages (torch, torchvision, CUDA and triton: the Kaggle image has them).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaggle_tta.errors import CheckpointError, KaggleTTAError

NOTEBOOK = "kaggle_tta_inference.ipynb"
MANIFEST = "kaggle_tta_bundle.json"
PACKAGE = "kaggle-tta"
# Left to the Kaggle image (fnmatch patterns on normalized distribution names).
DEFAULT_EXCLUDES = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton*", "nvidia-*", "cuda-*")
# Kaggle's image is Ubuntu 22.04 on x86_64 (glibc 2.35): used with --python-version.
_KAGGLE_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$")
_PIP_MISSING = re.compile(r"(?:No matching distribution found for|satisfies the requirement) ([A-Za-z0-9_.\-]+)==")


class KernelError(KaggleTTAError):
    """The offline bundle cannot be built: a file, an option or a dependency wheel."""


def default_wheel_cache() -> Path:
    """``$KAGGLE_TTA_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/kaggle-tta/wheels`` (``~/.cache``)."""
    if os.environ.get("KAGGLE_TTA_WHEEL_CACHE"):
        return Path(os.environ["KAGGLE_TTA_WHEEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kaggle-tta" / "wheels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kernel`` subcommand's arguments (cheap: the CLI builds every parser)."""
    p.add_argument("pipeline", help="path of pipeline.yaml")
    p.add_argument("--out", default="build/kaggle", help="output folder; gets dataset/ and kernel/ (default: build/kaggle)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a YAML value before bundling (repeatable)")
    p.add_argument("--owner", "--username", dest="owner", default=None, help="Kaggle user owning the dataset and kernel (default: $KAGGLE_USERNAME)")
    p.add_argument("--dataset-slug", default="kaggle-tta-bundle", help="slug of the dataset (default: kaggle-tta-bundle)")
    p.add_argument("--kernel-slug", default="kaggle-tta-inference", help="slug of the notebook kernel (default: kaggle-tta-inference)")
    p.add_argument("--competition", default=None, help="competition slug: attached to the kernel; its data is read from /kaggle/input")
    p.add_argument(
        "--data-root", type=Path, default=None,
        help="local copy of the competition data: data paths under it are read from the competition's folder on Kaggle",
    )
    p.add_argument("--bundle-data", action="store_true", help="ship the test data in the dataset even with --competition (default: only without one)")
    p.add_argument("--enable-gpu", action=argparse.BooleanOptionalAction, default=False, help="request a GPU for the kernel (default: no)")
    p.add_argument("--time-limit-hours", type=float, default=9.0, help="run-time limit the notebook checks its estimate against (default: 9)")
    p.add_argument(
        "--wheel-exclude", action="append", default=[], metavar="PATTERN",
        help=f"also leave these distributions to the Kaggle image (fnmatch, repeatable; always: {', '.join(DEFAULT_EXCLUDES)})",
    )
    p.add_argument("--extra-wheel", action="append", default=[], metavar="DIST", help="also bundle this installed distribution and what it needs (repeatable)")
    p.add_argument(
        "--wheel-cache", type=Path, default=None,
        help="folder keeping downloaded wheels between builds (default: $KAGGLE_TTA_WHEEL_CACHE or ~/.cache/kaggle-tta/wheels; '' for none)",
    )
    p.add_argument("--python-version", default=None, metavar="X.Y", help="build for another CPython on Kaggle's manylinux x86_64 (default: this interpreter)")


@dataclass
class KernelOptions:
    """What ``kaggle-tta kernel`` builds; the fields mirror the command-line options."""

    out: Path
    overrides: list[str] = field(default_factory=list)
    owner: str | None = None
    dataset_slug: str = "kaggle-tta-bundle"
    kernel_slug: str = "kaggle-tta-inference"
    competition: str | None = None
    data_root: Path | None = None
    bundle_data: bool = False
    enable_gpu: bool = False
    time_limit_hours: float = 9.0
    wheel_exclude: list[str] = field(default_factory=list)
    extra_wheels: list[str] = field(default_factory=list)
    wheel_cache: Path | None = field(default_factory=default_wheel_cache)
    python_version: str | None = None


@dataclass
class BundleReport:
    """What was written: the two folders and a summary for the user."""

    dataset_dir: Path
    kernel_dir: Path
    wheels: list[str]
    excluded: list[str]
    files: list[str]
    subfolders: list[str]
    owner_is_placeholder: bool
    size_bytes: int


def run(args: argparse.Namespace) -> None:
    """The CLI entry: builds the bundle and prints what to upload."""
    cache = args.wheel_cache
    opts = KernelOptions(
        out=Path(args.out), overrides=args.set, owner=args.owner, dataset_slug=args.dataset_slug, kernel_slug=args.kernel_slug,
        competition=args.competition, data_root=args.data_root, bundle_data=args.bundle_data, enable_gpu=args.enable_gpu,
        time_limit_hours=args.time_limit_hours, wheel_exclude=args.wheel_exclude, extra_wheels=args.extra_wheel,
        wheel_cache=default_wheel_cache() if cache is None else (None if str(cache) in ("", ".") else cache),
        python_version=args.python_version,
    )
    rep = build_bundle(Path(args.pipeline), opts)
    print(f"kernel: {rep.dataset_dir}: {len(rep.wheels)} wheels and {len(rep.files)} bundled file(s) or folder(s) ({rep.size_bytes / 1e6:.0f} MB)")
    print(f"kernel: left to the Kaggle image: {', '.join(rep.excluded) or 'nothing'}")
    print(f"kernel: {rep.kernel_dir}: {NOTEBOOK} and kernel-metadata.json (internet off, GPU {'on' if opts.enable_gpu else 'off'})")
    if rep.owner_is_placeholder:
        print("kernel: owner is a placeholder: pass --owner (or set KAGGLE_USERNAME) before uploading")
    mode = " --dir-mode zip" if rep.subfolders else ""
    print("upload with the kaggle CLI (internet on this machine):")
    print(f"  kaggle datasets create -p {rep.dataset_dir}{mode}   # later: kaggle datasets version -p {rep.dataset_dir}{mode} -m 'new weights'")
    print(f"  kaggle kernels push -p {rep.kernel_dir}")


# ---- the bundle ------------------------------------------------------------------------------


def build_bundle(pipeline: Path, opts: KernelOptions) -> BundleReport:
    """Checks everything, fetches the wheels, then writes ``opts.out/{dataset,kernel}``.

    Raises:
        KaggleTTAError: the pipeline is invalid, references a file that is missing or cannot be
            bundled, an option is malformed, or a dependency has no wheel; ``opts.out`` is then
            left as it was.
    """
    import yaml

    from kaggle_tta.config import apply_override, load_pipeline
    from kaggle_tta.plan import validate_static

    _check_options(opts)
    root = _project_root()
    cfg = load_pipeline(pipeline, opts.overrides)
    validate_static(cfg)
    raw = yaml.safe_load(pipeline.read_text(encoding="utf-8"))
    for assignment in opts.overrides:
        apply_override(raw, assignment)
    col = _Collector(cfg, raw, opts, pipeline)
    col.collect()
    target = _Target.of(opts.python_version)
    out = opts.out
    with tempfile.TemporaryDirectory(prefix="kaggle-tta-kernel-") as tmp:
        tmp_dir = Path(tmp)
        own = _build_own_wheel(root, tmp_dir / "own")
        roots = [(r, PACKAGE) for r in _wheel_requires(own)] + [(r, "--extra-wheel") for r in opts.extra_wheels] + sorted(col.distributions.items())
        excludes = list(DEFAULT_EXCLUDES) + list(opts.wheel_exclude)
        pins, excluded = _pin_closure(roots, excludes, target)
        cache = opts.wheel_cache or tmp_dir / "downloads"
        wheels = _fetch_wheels(pins, [out / "dataset", cache], cache, target)
        # Written beside the final folders, then swapped in: an interrupted build leaves the
        # previous bundle (or none), never a half-written one.
        stage, kernel_stage = out / ".dataset.partial", out / ".kernel.partial"
        try:
            for d in (stage, kernel_stage):
                _rmtree(d)
            _write_dataset(stage, col, own, wheels, excluded, opts, root, target)
            load_pipeline(stage / col.pipeline_name)  # the rewritten pipeline still validates
            _write_kernel(kernel_stage, col, opts, root)
            for name, staged in (("dataset", stage), ("kernel", kernel_stage)):
                _rmtree(out / name)
                staged.rename(out / name)
        finally:
            for d in (stage, kernel_stage):
                _rmtree(d)
    ds = out / "dataset"
    size = sum(p.stat().st_size for p in ds.rglob("*") if p.is_file())
    return BundleReport(
        ds, out / "kernel", sorted([own.name, *(w.name for w in wheels.values())]), excluded,
        sorted([*col.files, *col.trees, *col.tree_files]), sorted({n.split("/")[0] for n in [*col.trees, *col.tree_files]}), col.owner_placeholder, size,
    )


def _check_options(opts: KernelOptions) -> None:
    for flag, slug in (("--dataset-slug", opts.dataset_slug), ("--kernel-slug", opts.kernel_slug)):
        if not _SLUG.match(slug):
            raise KernelError(f"{flag} '{slug}': use 6-50 lowercase letters, digits and hyphens (the title made from it must have 6 or more characters)")
    if opts.competition is not None and not re.match(r"^[a-z0-9][a-z0-9-]*$", opts.competition):
        raise KernelError(f"--competition '{opts.competition}': give the competition's slug as in its URL, e.g. 'titanic'")
    if opts.owner is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", opts.owner):
        raise KernelError(f"--owner '{opts.owner}': give your Kaggle user name")
    if not opts.time_limit_hours > 0:
        raise KernelError(f"--time-limit-hours {opts.time_limit_hours}: must be positive (Kaggle notebooks: 9 for most competitions)")
    if opts.data_root is not None and opts.competition is None:
        raise KernelError("--data-root maps data paths onto a competition's folder on Kaggle: give --competition SLUG too")
    if opts.data_root is not None and not opts.data_root.is_dir():
        raise KernelError(f"--data-root {opts.data_root}: not a folder; give the local copy of the competition data")
    if opts.python_version is not None and not re.match(r"^3\.\d{1,2}$", opts.python_version):
        raise KernelError(f"--python-version '{opts.python_version}': give a CPython version like 3.11")


def _project_root() -> Path:
    """The source checkout this package runs from: the wheel is built from it, and the
    notebook and metadata templates are read from its ``kernels/`` folder."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / NOTEBOOK).is_file():
        raise KernelError(f"{root}: no pyproject.toml and kernels/{NOTEBOOK}; run 'kaggle-tta kernel' from a source checkout (pip install -e .)")
    return root


# ---- files the pipeline references -------------------------------------------------------------


class _Collector:
    """Decides where each referenced file goes and rewrites the raw YAML to match.

    Checkpoints and other member files go flat at the dataset's top level; test data goes to
    the competition's folder (when under --data-root or /kaggle/input) or, without a
    competition, into ``data/``; ``cache.dir`` and ``submission.path`` point at
    /kaggle/working (the notebook sets them again from the working folder it finds).
    """

    def __init__(self, cfg: Any, raw: dict[str, Any], opts: KernelOptions, source: Path):
        self.cfg, self.raw, self.opts, self.source = cfg, copy.deepcopy(raw), opts, source
        self.pipeline_name = source.name if source.suffix in (".yaml", ".yml") else "pipeline.yaml"
        self.files: dict[str, Path] = {}  # dataset name -> source file
        self.trees: dict[str, Path] = {}  # dataset sub-folder -> source folder (copied whole)
        self.tree_files: dict[str, Path] = {}  # dataset path under a sub-folder -> source file
        self.competition_paths: list[dict[str, Any]] = []
        self.bundled_paths: list[dict[str, str]] = []  # YAML keys pointing into data/ or code/
        self.distributions: dict[str, str] = {}  # installed distribution -> the factory needing it
        self.code_modules: list[str] = []
        self.owner = opts.owner or os.environ.get("KAGGLE_USERNAME") or "your-kaggle-username"
        self.owner_placeholder = not (opts.owner or os.environ.get("KAGGLE_USERNAME"))
        self._taken = {MANIFEST, "dataset-metadata.json", self.pipeline_name, "data", "code"}

    def collect(self) -> None:
        cfg, raw = self.cfg, self.raw
        for i, m in enumerate(cfg.members):
            where = f"members.{m.name}"
            node = raw["members"][i]
            if m.checkpoint is not None:
                path = cfg.resolve(m.checkpoint)
                if not path.is_file():
                    raise CheckpointError(f"{where}.checkpoint: {path} not found; fix the path (for the demo: make demo-weights) before bundling")
                node["checkpoint"] = self._flat(path, m.name)
            alb = m.preprocess.albumentations
            if alb is not None and not isinstance(alb, dict):
                node["preprocess"]["albumentations"] = self._flat(self._existing(cfg.resolve(alb), f"{where}.preprocess.albumentations"), m.name)
            for k, v in m.kwargs.items():  # models._call_factory resolves these keys as paths
                if k in ("f", "path", "file") and isinstance(v, str):
                    node["kwargs"][k] = self._flat(self._existing(cfg.resolve(v), f"{where}.kwargs.{k}"), m.name)
            if m.factory is not None:
                self._factory(m.factory, f"{where}.factory")
        self._data()
        raw.setdefault("cache", {})
        raw["cache"]["dir"] = "/kaggle/working/.kaggle_tta/cache"
        raw.setdefault("submission", {})
        raw["submission"]["path"] = "/kaggle/working/submission.csv"

    # -- helpers

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

    def _factory(self, spec: str, where: str) -> None:
        import importlib.metadata as md
        import importlib.util

        top = spec.partition(":")[0].split(".")[0]
        if top == "kaggle_tta":
            return
        dists = md.packages_distributions().get(top)
        if dists:
            self.distributions.setdefault(dists[0], where)
            return
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None or found.origin in (None, "built-in", "frozen"):
            raise KernelError(f"{where}: module '{top}' is not importable here, so it cannot be bundled; install it or fix the name")
        src = Path(found.origin)
        if found.submodule_search_locations:
            src = src.parent
        dest = f"code/{src.name}"
        if dest not in self.trees and dest not in self.tree_files:
            (self.trees if src.is_dir() else self.tree_files)[dest] = src
            self.code_modules.append(top)

    # -- data

    def _data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        node = self.raw["data"]
        if d.folder is not None:
            node["folder"] = self._data_path("data.folder", cfg.resolve(d.folder), "dir")
        elif d.glob is not None:
            node["glob"] = self._data_path("data.glob", cfg.resolve(d.glob), "glob")
        else:
            csv_path = cfg.resolve(d.csv.path)
            root = cfg.resolve(d.csv.root) if d.csv.root else csv_path.parent
            node["csv"]["path"] = self._data_path("data.csv.path", csv_path, "file")
            if d.csv.root is not None or not node["csv"]["path"].startswith("/kaggle/"):
                node["csv"]["root"] = self._data_path("data.csv.root", root, "csv-root")
        if d.labels is not None:
            node["labels"]["path"] = self._data_path("data.labels.path", cfg.resolve(d.labels.path), "file", optional=True)
        if d.masks is not None:  # segmentation ground truth: a folder of mask images
            node["masks"]["folder"] = self._data_path("data.masks.folder", cfg.resolve(d.masks.folder), "dir", optional=True)
        if d.boxes is not None:  # detection ground truth: a CSV of boxes
            node["boxes"]["path"] = self._data_path("data.boxes.path", cfg.resolve(d.boxes.path), "file", optional=True)
        if d.classes_file is not None:
            path = cfg.resolve(d.classes_file)
            rel = self._competition_rel(path)
            if rel is not None:
                node["classes_file"] = self._competition("data.classes_file", rel, "file")
            else:
                node["classes_file"] = self._flat(self._existing(path, "data.classes_file"), "classes")

    def _competition_rel(self, path: Path) -> str | None:
        comp = self.opts.competition
        if comp is None:
            return None
        text = Path(os.path.normpath(str(path))).as_posix()
        for prefix in (f"/kaggle/input/competitions/{comp}", f"/kaggle/input/{comp}"):
            if text == prefix or text.startswith(prefix + "/"):
                return text[len(prefix):].lstrip("/") or "."
        if self.opts.data_root is not None:
            for base, p in ((self.opts.data_root.resolve(), path.resolve()), (Path(os.path.abspath(self.opts.data_root)), Path(os.path.abspath(path)))):
                if p == base or base in p.parents:
                    return p.relative_to(base).as_posix() or "."
        return None

    def _competition(self, key: str, rel: str, kind: str, optional: bool = False) -> str:
        self.competition_paths.append({"key": key, "path": rel, "kind": kind, "optional": optional})
        return f"/kaggle/input/{self.opts.competition}/{rel}"

    def _data_path(self, key: str, path: Path, kind: str, optional: bool = False) -> str:
        rel = self._competition_rel(path)
        if rel is not None:
            return self._competition(key, rel, "dir" if kind == "csv-root" else kind, optional)
        if self.opts.competition is not None and not self.opts.bundle_data:
            where = f"it is not under --data-root {self.opts.data_root}" if self.opts.data_root else "no --data-root says where the competition data lies here"
            raise KernelError(
                f"{key}: {path}: with --competition the test data is read from the competition's folder on Kaggle, but {where}; "
                "give --data-root (your local copy of the competition data), or --bundle-data to ship this data in the dataset"
            )
        return self._bundle_data(key, path, kind)

    def _bundle_data(self, key: str, path: Path, kind: str) -> str:
        fix = "create it first (for the demo: make demo-data) or fix the path"
        if kind == "glob":
            import glob as globlib

            base = Path(path.anchor)
            parts = path.relative_to(base).parts
            for i, part in enumerate(parts):
                if globlib.has_magic(part):
                    base, rest = base.joinpath(*parts[:i]), "/".join(parts[i:])
                    break
            else:
                base, rest = path.parent, path.name
            files = [Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file()]
            if not files:
                raise KernelError(f"{key}: {path} matches no file, so there is nothing to bundle; {fix}")
            dest = self._data_dir(base.name or "test")
            for f in files:
                self.tree_files[f"{dest}/{f.relative_to(base).as_posix()}"] = f
            return self._bundled(key, f"{dest}/{rest}")
        if kind in ("dir", "csv-root"):
            if not path.is_dir():
                raise KernelError(f"{key}: {path} is not a folder, so it cannot be bundled; {fix}")
            for dest, src in self.trees.items():
                if src == path.resolve():
                    return self._bundled(key, dest)
            if kind == "csv-root":  # only the images the CSV lists, not the whole folder
                return self._bundle_csv_root(key, path)
            dest = self._data_dir(path.name)
            self.trees[dest] = path.resolve()
            return self._bundled(key, dest)
        if not path.is_file():
            raise KernelError(f"{key}: {path} is not a file, so it cannot be bundled; {fix}")
        for dest, src in self.trees.items():  # a file inside a bundled folder (labels.csv in the test folder)
            if src in path.resolve().parents:
                return self._bundled(key, f"{dest}/{path.resolve().relative_to(src).as_posix()}")
        dest = f"data/{self._name(path.name, 'data')}"
        self.tree_files[dest] = path.resolve()
        return self._bundled(key, dest)

    def _bundle_csv_root(self, key: str, root: Path) -> str:
        from kaggle_tta.data import list_test_set

        dest = self._data_dir(root.name)
        for p in map(Path, list_test_set(self.cfg).paths):
            try:
                rel = p.resolve().relative_to(root.resolve())
            except ValueError:
                raise KernelError(f"data.csv: {p} is outside {root}, so it cannot be bundled; list paths relative to data.csv.root") from None
            self.tree_files[f"{dest}/{rel.as_posix()}"] = p.resolve()
        return self._bundled(key, dest)

    def _data_dir(self, name: str) -> str:
        return f"data/{self._name(name or 'test', 'data')}"

    def _bundled(self, key: str, dest: str) -> str:
        self.bundled_paths.append({"key": key, "path": dest})
        return dest


# ---- wheels ----------------------------------------------------------------------------------


@dataclass
class _Target:
    """The interpreter the wheels are for: this one, or CPython X.Y on Kaggle's platform."""

    python_version: str | None
    tags: list[Any]
    env: dict[str, str]
    pip_args: list[str]

    @classmethod
    def of(cls, python_version: str | None) -> _Target:
        from packaging import tags
        from packaging.markers import default_environment

        env = dict(default_environment())
        local = f"{sys.version_info.major}.{sys.version_info.minor}"
        if python_version is None or python_version == local:
            return cls(None, list(tags.sys_tags()), env, [])
        ver = tuple(int(x) for x in python_version.split("."))
        tag_list = list(tags.cpython_tags(ver, platforms=_KAGGLE_PLATFORMS)) + list(tags.compatible_tags(ver, f"cp{ver[0]}{ver[1]}", _KAGGLE_PLATFORMS))
        env.update(python_version=python_version, python_full_version=f"{python_version}.0", implementation_name="cpython",
                   platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
        args = ["--python-version", python_version, "--implementation", "cp"] + [a for p in _KAGGLE_PLATFORMS for a in ("--platform", p)]
        return cls(python_version, tag_list, env, args)

    def describe(self) -> str:
        if self.python_version is None:
            return f"this interpreter (CPython {sys.version_info.major}.{sys.version_info.minor}, {sys.platform})"
        return f"CPython {self.python_version} on manylinux x86_64"


def _build_own_wheel(root: Path, dest: Path) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the checkout (no build/ left in the tree)."""
    import importlib.util

    src = dest.parent / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE"):
        if (root / name).is_file():
            shutil.copy2(root / name, src / name)
    shutil.copytree(root / "kaggle_tta", src / "kaggle_tta", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    print("kernel: building the kaggle_tta wheel", flush=True)
    isolation = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    res = _pip(["wheel", "--no-deps", *isolation, "-w", str(dest), str(src)])
    built = sorted(dest.glob("kaggle_tta-*.whl"))
    if res.returncode != 0 or not built:
        raise KernelError(f"{root}: 'pip wheel --no-deps .' failed: {_pip_error(res)}; fix pyproject.toml and retry")
    return built[0]


def _wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode("utf-8"))
    return meta.get_all("Requires-Dist") or []


def _pin_closure(roots: list[tuple[str, str]], excludes: list[str], target: _Target) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Walks the installed metadata from ``roots`` ((requirement, who asks)): normalized name ->
    (version, required by).

    Returns the pins and the excluded names that were reached (the Kaggle image must have them).
    """
    import importlib.metadata as md

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    pins: dict[str, tuple[str, str]] = {}
    excluded: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    # (requirement text, who requires it, the extras that parent was asked for)
    stack: list[tuple[str, str, frozenset[str]]] = [(r, who, frozenset()) for r, who in reversed(roots)]
    while stack:
        text, parent, parent_extras = stack.pop()
        try:
            req = Requirement(text)
        except InvalidRequirement:
            raise KernelError(f"wheels: '{text}' (from {parent}) is not a requirement; give a distribution name") from None
        if req.marker is not None and not any(req.marker.evaluate({**target.env, "extra": e}) for e in ["", *parent_extras]):
            continue
        name = canonicalize_name(req.name)
        if any(fnmatch.fnmatch(name, pat) for pat in excludes):
            excluded.add(name)
            continue
        key = (name, frozenset(canonicalize_name(e) for e in req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise KernelError(
                f"wheels: {req.name} (required by {parent}) is not installed here, so which version to bundle is unknown; "
                f"pip install '{req}' or add '{name}' to --wheel-exclude if the Kaggle image has it"
            ) from None
        try:
            ok = req.specifier.contains(Version(dist.version), prereleases=True)
        except InvalidVersion:
            ok = True
        if not ok:
            raise KernelError(f"wheels: {name} {dist.version} is installed here but {parent} needs '{req}'; pip install '{req}' and rebuild")
        pins.setdefault(name, (dist.version, parent))
        for sub in reversed(dist.requires or []):
            stack.append((sub, name, key[1]))
    return pins, sorted(excluded)


def _index_wheels(folders: list[Path], target: _Target) -> dict[tuple[str, str], Path]:
    """(name, version) -> the best wheel for the target found in ``folders``."""
    from packaging.utils import InvalidWheelFilename, canonicalize_version, parse_wheel_filename

    rank = {t: i for i, t in enumerate(target.tags)}
    best: dict[tuple[str, str], tuple[int, Path]] = {}
    for folder in folders:
        for p in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
            try:
                name, version, _, wtags = parse_wheel_filename(p.name)
            except InvalidWheelFilename:
                continue
            score = min((rank[t] for t in wtags if t in rank), default=None)
            key = (str(name), canonicalize_version(version))
            if score is not None and (key not in best or score < best[key][0]):
                best[key] = (score, p)
    return {k: v[1] for k, v in best.items()}


def _fetch_wheels(pins: dict[str, tuple[str, str]], folders: list[Path], download_to: Path, target: _Target) -> dict[str, Path]:
    """A wheel per pin: reused from ``folders``, else fetched with pip into ``download_to``."""
    from packaging.utils import canonicalize_version

    def lookup() -> tuple[dict[str, Path], list[str]]:
        have = _index_wheels(folders + [download_to], target)
        found, missing = {}, []
        for name, (version, _) in pins.items():
            hit = have.get((name, canonicalize_version(version)))
            if hit is None:
                missing.append(name)
            else:
                found[name] = hit
        return found, missing

    found, missing = lookup()
    if missing:
        download_to.mkdir(parents=True, exist_ok=True)
        print(f"kernel: fetching {len(missing)} wheel(s) with pip into {download_to}", flush=True)
    tried_build: set[str] = set()
    while missing:
        reqs = [f"{n}=={pins[n][0]}" for n in missing]
        res = _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(download_to), *target.pip_args, *reqs])
        if res.returncode == 0:
            found, missing = lookup()
            if missing:  # pip saved something our tag check refuses (should not happen)
                n = missing[0]
                raise KernelError(f"wheels: pip fetched {n}=={pins[n][0]}, but no wheel for {target.describe()} is in {download_to}; delete it and rebuild")
            break
        bad = _failed_requirement(res, missing)
        if bad is None:
            raise KernelError(f"wheels: pip download failed: {_pip_error(res)}; check the network access to the package index and rebuild")
        version, parent = pins[bad]
        if target.python_version is None and bad not in tried_build:  # only an sdist: build it here
            tried_build.add(bad)
            built = _pip(["wheel", "--no-deps", "-w", str(download_to), f"{bad}=={version}"])
            if built.returncode == 0:
                found, missing = lookup()
                continue
        raise KernelError(
            f"wheels: no wheel of {bad}=={version} (required by {parent}) for {target.describe()}: {_pip_error(res)}. "
            f"Put one in {download_to} (pip wheel {bad}=={version} -w {download_to}), install a version that has one, "
            f"or add '{bad}' to --wheel-exclude if the Kaggle image has it"
        )
    return found


def _failed_requirement(res: subprocess.CompletedProcess, candidates: list[str]) -> str | None:
    from packaging.utils import canonicalize_name

    for m in _PIP_MISSING.finditer(res.stdout + res.stderr):
        name = canonicalize_name(m.group(1))
        if name in candidates:
            return name
    return None


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True)


def _pip_error(res: subprocess.CompletedProcess) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.stderr or res.stdout)  # pip colours its errors on some terminals
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors[-1] if errors else lines[-1] if lines else f"exit status {res.returncode}")[:300]


# ---- writing -----------------------------------------------------------------------------------


def _write_dataset(
    stage: Path, col: _Collector, own: Path, wheels: dict[str, Path], excluded: list[str], opts: KernelOptions, root: Path, target: _Target
) -> None:
    import yaml

    stage.mkdir(parents=True)
    for w in [own, *wheels.values()]:
        _link_or_copy(w, stage / w.name)
    # The user's files are copied, not linked: the dataset is a snapshot, and checkpoints are
    # often rewritten in place. Wheels in the cache never are, so those are hard-linked.
    for name, src in col.files.items():
        shutil.copy2(src, stage / name)
    for name, src in col.trees.items():
        shutil.copytree(src, stage / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name, src in col.tree_files.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, stage / name)
    header = (
        f"# Rewritten by 'kaggle-tta kernel' from {col.source.resolve()}: paths are relative to this\n"
        "# dataset; the notebook points competition data, cache.dir and submission.path at what it finds.\n"
    )
    (stage / col.pipeline_name).write_text(header + yaml.safe_dump(col.raw, sort_keys=False, allow_unicode=True, default_flow_style=None), encoding="utf-8")
    manifest = {
        "format": 1,
        "pipeline": col.pipeline_name,
        "dataset": f"{col.owner}/{opts.dataset_slug}",
        "package": {"name": PACKAGE, "version": _wheel_version(own), "wheel": own.name},
        "wheels": sorted(w.name for w in wheels.values()),
        "provided_by_image": excluded,
        "built_for": target.describe(),
        "competition": opts.competition,
        "competition_paths": col.competition_paths,
        "bundled_paths": col.bundled_paths,
        "code_dirs": ["code"] if col.code_modules else [],
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    meta = _template(root / "kernels" / "dataset-metadata.json", OWNER=col.owner, DATASET_SLUG=opts.dataset_slug, DATASET_TITLE=_title(opts.dataset_slug))
    (stage / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _write_kernel(stage: Path, col: _Collector, opts: KernelOptions, root: Path) -> None:
    stage.mkdir(parents=True)
    nb = json.loads((root / "kernels" / NOTEBOOK).read_text(encoding="utf-8"))
    values = {
        "DATASET_SLUG": opts.dataset_slug,
        "PIPELINE": col.pipeline_name,
        "COMPETITION": opts.competition or "",
        "TIME_LIMIT_HOURS": float(opts.time_limit_hours),
    }
    cell = next((c for c in nb["cells"] if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise KernelError(f"kernels/{NOTEBOOK}: no code cell tagged 'parameters'; restore the template")
    src = "".join(cell["source"])
    for name, value in values.items():
        src, n = re.subn(rf"^{name} = .*?(\s+#.*)?$", lambda m, v=value, k=name: f"{k} = {_py_literal(v)}{m.group(1) or ''}", src, count=1, flags=re.M)
        if n != 1:
            raise KernelError(f"kernels/{NOTEBOOK}: the parameters cell has no '{name} = ...' line; restore the template")
    cell["source"] = src.splitlines(keepends=True)
    (stage / NOTEBOOK).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = _template(root / "kernels" / "kernel-metadata.json", OWNER=col.owner, KERNEL_SLUG=opts.kernel_slug, KERNEL_TITLE=_title(opts.kernel_slug))
    meta.update(
        code_file=NOTEBOOK, language="python", kernel_type="notebook", enable_gpu=bool(opts.enable_gpu), enable_internet=False,
        dataset_sources=[f"{col.owner}/{opts.dataset_slug}"], competition_sources=[opts.competition] if opts.competition else [],
    )
    (stage / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _py_literal(value: str | float) -> str:
    """A Python literal in the notebook's style (double-quoted strings)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _template(path: Path, **values: str) -> dict[str, Any]:
    """A JSON template with ``${NAME}`` placeholders in its strings."""
    from string import Template

    def fill(x: Any) -> Any:
        if isinstance(x, str):
            return Template(x).safe_substitute(values)
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return x

    try:
        return fill(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise KernelError(f"{path}: cannot read the template ({exc}); restore it from the repository") from None


def _title(slug: str) -> str:
    """A title Kaggle turns back into the same slug (it warns and makes a new kernel otherwise)."""
    return slug.replace("-", " ")


def _wheel_version(wheel: Path) -> str:
    from packaging.utils import parse_wheel_filename

    return str(parse_wheel_filename(wheel.name)[1])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


