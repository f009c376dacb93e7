"""``build_bundle``: checks everything and fetches every wheel, then writes the three folders at once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kaggle_tta.config.errors import ConfigError, UserPath, shown_path
from kaggle_tta.kernel.bundle import collect_files
from kaggle_tta.kernel.image import left_out
from kaggle_tta.kernel.options import (
    DEFAULT_EXCLUDES,
    KAGGLE_PYTHON,
    NOTEBOOK,
    PACKAGE,
    WHEELS_MANIFEST,
    BundleReport,
    KernelError,
    KernelOptions,
    check_options,
)
from kaggle_tta.kernel.wheels import build_own_wheel, fetch_wheels, pin_closure, read_wheel_requires, resolve_target
from kaggle_tta.kernel.write import wheels_ref, write_dataset, write_kernel, write_wheels

if TYPE_CHECKING:
    from kaggle_tta.kernel.bundle import Collector
    from kaggle_tta.kernel.wheels import Target


def build_bundle(pipeline: Path, opts: KernelOptions) -> BundleReport:
    """Checks everything, fetches the wheels, then writes ``opts.out/{wheels,dataset,kernel}``.

    Raises:
        KaggleTTAError: the pipeline is invalid, references a file that is missing or cannot be
            bundled, an option is malformed, or a dependency has no wheel; ``opts.out`` is then
            left as it was.
    """

    check_options(opts)
    out = opts.out
    if out.exists() and not out.is_dir():  # before any wheel is fetched
        raise ConfigError(f"--out {shown_path(out)}: a file, not a folder; give a folder (made if missing)")
    root = _project_root()
    col = _collect(pipeline, opts)
    target = resolve_target(opts.python_version)
    with tempfile.TemporaryDirectory(prefix="kaggle-tta-kernel-") as tmp:
        tmp_dir = Path(tmp)
        own = build_own_wheel(root, tmp_dir / "own")
        roots = (
            [(r, PACKAGE) for r in read_wheel_requires(own)]
            + [(r, "--extra-wheel") for r in opts.extra_wheels]
            + sorted(col.distributions.items())
        )
        excludes = list(DEFAULT_EXCLUDES) + list(opts.wheel_exclude)
        specs: dict[str, str] = {}
        pins, excluded = pin_closure(roots, excludes, target, specs)
        # the list describes the Kaggle image: a bundle for another Python is for another image
        image_has = left_out(pins, specs, opts.wheel_include) if opts.lean and target.python == KAGGLE_PYTHON else {}
        if image_has:  # walked again, not into what the image has: its own requirements come with it
            needs: dict[str, str] = {}  # what kaggle_tta and the bundled wheels ask of them, only
            pins, reached = pin_closure(roots, excludes + sorted(image_has), target, needs)
            image_has = {name: needs.get(name, "") for name in image_has if name in reached}
        cache = opts.wheel_cache or tmp_dir / "downloads"
        wheels = fetch_wheels(pins, [out / "wheels", out / "dataset", cache], cache, target)
        ref, set_id = wheels_ref(col.owner, opts, wheels)
        unchanged = _wheel_set_of(out / "wheels") == set_id
        with UserPath(out, "give --out a folder you can write", ConfigError):  # the user's folder
            _write_folders(out, col, own, wheels, excluded, opts, root, target, ref, image_has)
    return _report(out, col, own, wheels, excluded, ref, unchanged)


def _collect(pipeline: Path, opts: KernelOptions) -> Collector:
    """The pipeline loaded and checked with the overrides, and the files it needs bundled."""
    from kaggle_tta.config import apply_override, load_pipeline
    from kaggle_tta.config.yaml_files import read_yaml_file
    from kaggle_tta.engine.plan import validate_static

    cfg = load_pipeline(pipeline, opts.overrides)
    validate_static(cfg)
    raw = read_yaml_file(pipeline, "pipeline file")
    for assignment in opts.overrides:
        apply_override(raw, assignment)
    return collect_files(cfg, raw, opts, pipeline)


def _write_folders(
    out: Path,
    col: Collector,
    own: Path,
    wheels: dict[str, Path],
    excluded: list[str],
    opts: KernelOptions,
    root: Path,
    target: Target,
    ref: str,
    image_has: dict[str, str],
) -> None:
    """Writes the wheels, dataset and kernel folders under ``out``."""
    from kaggle_tta.config import load_pipeline

    # Written beside the final folders, then swapped in: an interrupted build leaves the
    # previous bundle (or none), never a half-written one.
    stages = {
        "wheels": out / ".wheels.partial",
        "dataset": out / ".dataset.partial",
        "kernel": out / ".kernel.partial",
    }
    try:
        for d in stages.values():
            _rmtree(d)
        write_wheels(stages["wheels"], col.owner, wheels, excluded, opts, root, target, image_has)
        write_dataset(stages["dataset"], col, own, wheels, excluded, opts, root, target, image_has)
        load_pipeline(stages["dataset"] / col.pipeline_name)  # the rewritten pipeline still validates
        write_kernel(stages["kernel"], col, opts, root, ref)
        for name, staged in stages.items():
            _rmtree(out / name)
            staged.rename(out / name)
    finally:
        for d in stages.values():
            _rmtree(d)


def _report(
    out: Path,
    col: Collector,
    own: Path,
    wheels: dict[str, Path],
    excluded: list[str],
    ref: str,
    unchanged: bool,
) -> BundleReport:
    """What was written, for the CLI to print."""
    ds, wd = out / "dataset", out / "wheels"
    return BundleReport(
        ds,
        out / "kernel",
        sorted([own.name, *(w.name for w in wheels.values())]),
        excluded,
        sorted([*col.files, *col.trees, *col.tree_files]),
        sorted({n.split("/")[0] for n in [*col.trees, *col.tree_files]}),
        col.owner_placeholder,
        _size(ds),
        wd,
        ref,
        _size(wd),
        unchanged,
    )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _wheel_set_of(folder: Path) -> str | None:
    """The wheel-set id of a wheels folder an earlier build left, if any."""
    import json

    try:
        return json.loads((folder / WHEELS_MANIFEST).read_text(encoding="utf-8")).get("wheel_set")
    except (OSError, ValueError, AttributeError):
        return None


def _project_root() -> Path:
    """The source checkout this package runs from: the wheel is built from it, and the
    notebook and metadata templates are read from its ``kernels/`` folder."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / NOTEBOOK).is_file():
        raise KernelError(
            f"{root}: no pyproject.toml and kernels/{NOTEBOOK}; run 'kaggle-tta kernel' from a source checkout "
            "(pip install -e .)"
        )
    return root


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
