"""``build_bundle``: checks everything and fetches every wheel, then writes both folders at once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kaggle_tta.kernel.bundle import collect_files
from kaggle_tta.kernel.options import DEFAULT_EXCLUDES, NOTEBOOK, PACKAGE, BundleReport, KernelError, KernelOptions, check_options
from kaggle_tta.kernel.wheels import build_own_wheel, fetch_wheels, pin_closure, read_wheel_requires, resolve_target
from kaggle_tta.kernel.write import write_dataset, write_kernel


def build_bundle(pipeline: Path, opts: KernelOptions) -> BundleReport:
    """Checks everything, fetches the wheels, then writes ``opts.out/{dataset,kernel}``.

    Raises:
        KaggleTTAError: the pipeline is invalid, references a file that is missing or cannot be
            bundled, an option is malformed, or a dependency has no wheel; ``opts.out`` is then
            left as it was.
    """

    from kaggle_tta.config import apply_override, load_pipeline
    from kaggle_tta.config.loading import read_yaml_file
    from kaggle_tta.plan import validate_static

    check_options(opts)
    root = _project_root()
    cfg = load_pipeline(pipeline, opts.overrides)
    validate_static(cfg)
    raw = read_yaml_file(pipeline, "pipeline file")
    for assignment in opts.overrides:
        apply_override(raw, assignment)
    col = collect_files(cfg, raw, opts, pipeline)
    target = resolve_target(opts.python_version)
    out = opts.out
    with tempfile.TemporaryDirectory(prefix="kaggle-tta-kernel-") as tmp:
        tmp_dir = Path(tmp)
        own = build_own_wheel(root, tmp_dir / "own")
        roots = [(r, PACKAGE) for r in read_wheel_requires(own)] + [(r, "--extra-wheel") for r in opts.extra_wheels] + sorted(col.distributions.items())
        excludes = list(DEFAULT_EXCLUDES) + list(opts.wheel_exclude)
        pins, excluded = pin_closure(roots, excludes, target)
        cache = opts.wheel_cache or tmp_dir / "downloads"
        wheels = fetch_wheels(pins, [out / "dataset", cache], cache, target)
        # Written beside the final folders, then swapped in: an interrupted build leaves the
        # previous bundle (or none), never a half-written one.
        stage, kernel_stage = out / ".dataset.partial", out / ".kernel.partial"
        try:
            for d in (stage, kernel_stage):
                _rmtree(d)
            write_dataset(stage, col, own, wheels, excluded, opts, root, target)
            load_pipeline(stage / col.pipeline_name)  # the rewritten pipeline still validates
            write_kernel(kernel_stage, col, opts, root)
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


def _project_root() -> Path:
    """The source checkout this package runs from: the wheel is built from it, and the
    notebook and metadata templates are read from its ``kernels/`` folder."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / NOTEBOOK).is_file():
        raise KernelError(f"{root}: no pyproject.toml and kernels/{NOTEBOOK}; run 'kaggle-tta kernel' from a source checkout (pip install -e .)")
    return root


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
