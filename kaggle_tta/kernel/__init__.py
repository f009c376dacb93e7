"""The offline Kaggle bundle: ``kaggle-tta kernel PIPELINE --out DIR``.

Kaggle runs code-competition notebooks with the internet off, so everything a run needs must
come from attached inputs. This builds three folders, ready for the ``kaggle`` CLI:

- ``DIR/wheels``: a Kaggle dataset of the wheels of every dependency the Kaggle image lacks,
  built for the image's Python (``KAGGLE_PYTHON``, or ``--python-version``), with
  ``kaggle_tta_wheels.json``. Its slug ends in a hash of the wheel set, so it changes only when
  the dependencies do and an unchanged set need not be uploaded again.
- ``DIR/dataset``: the small dataset that changes per submission: kaggle_tta's own wheel, the
  checkpoints and other files the pipeline references, the pipeline rewritten with paths
  relative to the dataset, ``kaggle_tta_bundle.json`` (what the notebook needs to know, the
  wheels dataset included) and ``dataset-metadata.json``. Test data is bundled (under
  ``data/``) only when there is no competition to read it from.
- ``DIR/kernel``: the notebook ``kernels/kaggle_tta_inference.ipynb`` with its parameters cell
  filled in, and ``kernel-metadata.json`` with ``enable_internet: false`` written out
  (Kaggle's API turns the internet on when the key is absent), both datasets attached, the
  image pinned and, with the GPU on, the machine named (a GPU kernel without
  ``machine_shape`` lands on a P100, which the image's torch cannot run).

Everything is checked, and every wheel found or fetched, before DIR is touched: a missing
checkpoint, a file that cannot be bundled or a dependency without a wheel raises a
KaggleTTAError naming it and leaves no half-built bundle. Nothing is uploaded; the only network
use is pip asking the package index for wheels missing from the wheel cache.

The package: ``options`` (what is asked, what is reported, KernelError), ``bundle`` (the files
the pipeline references, found by walking the schema's path marks, and the YAML rewritten to
match), ``wheels`` (which versions, for which interpreter, fetched or built), ``write`` (the
dataset and kernel folders, from the templates in ``kernels/``) and ``build`` (all of it, in
order). Importing this module stays light: the CLI builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_tta.kernel.build import build_bundle
from kaggle_tta.kernel.bundle import Collector, collect_files, list_marked
from kaggle_tta.kernel.options import (
    DATASET_LICENSES,
    DEFAULT_EXCLUDES,
    DEFAULT_LICENSE,
    DEFAULT_MACHINE_SHAPE,
    DEFAULT_PINNING,
    DEFAULT_WHEELS_LICENSE,
    KAGGLE_PYTHON,
    MACHINE_SHAPES,
    MANIFEST,
    NOTEBOOK,
    PACKAGE,
    PINNING_TYPES,
    WHEELS_MANIFEST,
    BundleReport,
    KernelError,
    KernelOptions,
    default_wheel_cache,
)
from kaggle_tta.kernel.wheels import Target, pin_closure, resolve_target, wheel_set_id
from kaggle_tta.kernel.write import wheels_ref, write_dataset, write_kernel, write_wheels

__all__ = [
    "DATASET_LICENSES",
    "DEFAULT_EXCLUDES",
    "DEFAULT_LICENSE",
    "DEFAULT_MACHINE_SHAPE",
    "DEFAULT_PINNING",
    "DEFAULT_WHEELS_LICENSE",
    "KAGGLE_PYTHON",
    "MACHINE_SHAPES",
    "MANIFEST",
    "NOTEBOOK",
    "PACKAGE",
    "PINNING_TYPES",
    "WHEELS_MANIFEST",
    "BundleReport",
    "Collector",
    "KernelError",
    "KernelOptions",
    "Target",
    "add_arguments",
    "build_bundle",
    "collect_files",
    "default_wheel_cache",
    "list_marked",
    "pin_closure",
    "resolve_target",
    "run",
    "wheel_set_id",
    "wheels_ref",
    "write_dataset",
    "write_kernel",
    "write_wheels",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kernel`` subcommand's arguments (cheap: the CLI builds every parser)."""
    _add_input_arguments(p)
    _add_naming_arguments(p)
    _add_data_arguments(p)
    _add_kernel_arguments(p)
    _add_wheel_arguments(p)


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline, where the bundle goes, and overrides of its YAML."""
    p.add_argument("pipeline", help="path of pipeline.yaml")
    p.add_argument(
        "--out", default="build/kaggle", help="output folder; gets dataset/ and kernel/ (default: build/kaggle)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a YAML value before bundling (repeatable)",
    )


def _add_naming_arguments(p: argparse.ArgumentParser) -> None:
    """Who owns the bundle on Kaggle and the slugs of its datasets and kernel."""
    p.add_argument(
        "--owner",
        "--username",
        dest="owner",
        default=None,
        help="Kaggle user owning the dataset and kernel (default: $KAGGLE_USERNAME)",
    )
    p.add_argument(
        "--dataset-slug",
        default="kaggle-tta-bundle",
        help="slug of the dataset of weights and pipeline (default: kaggle-tta-bundle)",
    )
    p.add_argument(
        "--wheels-slug-prefix",
        default="kaggle-tta-wheels",
        help="slug of the wheels dataset, before the hash of the wheel set (default: kaggle-tta-wheels)",
    )
    p.add_argument(
        "--kernel-slug",
        default="kaggle-tta-inference",
        help="slug of the notebook kernel (default: kaggle-tta-inference)",
    )


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The competition and where the test data is read from on Kaggle."""
    p.add_argument(
        "--competition",
        default=None,
        help="competition slug: attached to the kernel; its data is read from /kaggle/input",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="local copy of the competition data: data paths under it are read from the competition's folder on Kaggle",
    )
    p.add_argument(
        "--bundle-data",
        action="store_true",
        help="ship the test data in the dataset even with --competition (default: only without one)",
    )


def _add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    """The kernel's accelerator, image, licences and run-time limit."""
    p.add_argument(
        "--enable-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"request a GPU for the kernel (default: no; on with --machine-shape); it is {DEFAULT_MACHINE_SHAPE} "
        "unless --machine-shape says otherwise",
    )
    p.add_argument(
        "--machine-shape",
        default=None,
        metavar="NAME",
        help=f"the accelerator, as Kaggle names it (default with the GPU on: {DEFAULT_MACHINE_SHAPE}, GPU T4 x2; one "
        f"of: {', '.join(MACHINE_SHAPES)})",
    )
    p.add_argument(
        "--docker-image-pinning",
        default=DEFAULT_PINNING,
        metavar="|".join(PINNING_TYPES),
        help=f"kernel-metadata's docker_image_pinning_type (default: {DEFAULT_PINNING}: new versions keep the image "
        "the kernel first ran in)",
    )
    p.add_argument(
        "--license",
        default=DEFAULT_LICENSE,
        metavar="NAME",
        help=f"licence of the dataset of weights and pipeline, as Kaggle names it (default: {DEFAULT_LICENSE})",
    )
    p.add_argument(
        "--wheels-license",
        default=DEFAULT_WHEELS_LICENSE,
        metavar="NAME",
        help=f"licence of the wheels dataset (default: {DEFAULT_WHEELS_LICENSE}: each wheel keeps its project's own, "
        "said in the description)",
    )
    p.add_argument(
        "--serve",
        default=None,
        metavar="MODULE:CLASS",
        help="a code competition's kaggle_evaluation inference server (e.g. "
        "kaggle_evaluation.foo_inference_server:FooInferenceServer): the notebook serves predictions through it",
    )
    p.add_argument(
        "--time-limit-hours",
        type=float,
        default=9.0,
        help="run-time limit the notebook checks its estimate against (default: 9)",
    )


def _add_wheel_arguments(p: argparse.ArgumentParser) -> None:
    """Which wheels are bundled, where they are cached, and the CPython they are for."""
    p.add_argument(
        "--wheel-exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave these distributions to the Kaggle image (fnmatch, repeatable; always: "
        f"{', '.join(DEFAULT_EXCLUDES)})",
    )
    p.add_argument(
        "--no-lean",
        dest="lean",
        action="store_false",
        help="bundle every dependency's wheel, even those the Kaggle image has at an accepted version "
        "(kaggle_tta/kernel/kaggle_image.txt)",
    )
    p.add_argument(
        "--wheel-include",
        action="append",
        default=[],
        metavar="DIST",
        help="bundle this distribution's wheel even where the Kaggle image has it (repeatable)",
    )
    p.add_argument(
        "--extra-wheel",
        action="append",
        default=[],
        metavar="DIST",
        help="also bundle this installed distribution and what it needs (repeatable)",
    )
    p.add_argument(
        "--wheel-cache",
        type=Path,
        default=None,
        help="folder keeping downloaded wheels between builds (default: $KAGGLE_TTA_WHEEL_CACHE or "
        "~/.cache/kaggle-tta/wheels; '' for none)",
    )
    p.add_argument(
        "--python-version",
        default=KAGGLE_PYTHON,
        metavar="X.Y",
        help=f"CPython the wheels are for, on Kaggle's manylinux x86_64 (default: {KAGGLE_PYTHON}, the Kaggle image's)",
    )


def run(args: argparse.Namespace) -> None:
    """The CLI entry: builds the bundle and prints what to upload."""
    cache = args.wheel_cache
    opts = KernelOptions(
        out=Path(args.out),
        overrides=args.set,
        owner=args.owner,
        dataset_slug=args.dataset_slug,
        kernel_slug=args.kernel_slug,
        competition=args.competition,
        data_root=args.data_root,
        bundle_data=args.bundle_data,
        enable_gpu=args.enable_gpu,
        machine_shape=args.machine_shape,
        docker_image_pinning=args.docker_image_pinning,
        license=args.license,
        wheels_license=args.wheels_license,
        wheels_slug_prefix=args.wheels_slug_prefix,
        time_limit_hours=args.time_limit_hours,
        wheel_exclude=args.wheel_exclude,
        lean=args.lean,
        serve=args.serve,
        wheel_include=args.wheel_include,
        extra_wheels=args.extra_wheel,
        wheel_cache=default_wheel_cache() if cache is None else (None if str(cache) in ("", ".") else cache),
        python_version=args.python_version,
    )
    rep = build_bundle(Path(args.pipeline), opts)
    n_deps = len(rep.wheels) - 1
    print(
        f"kernel: {rep.wheels_dir}: {rep.wheels_ref}, {n_deps} dependency wheels ({_mb(rep.wheels_size_bytes)})"
        + (": the same wheel set as the last build here" if rep.wheels_unchanged else "")
    )
    print(
        f"kernel: {rep.dataset_dir}: kaggle-tta's wheel and {len(rep.files)} bundled file(s) or folder(s) "
        f"({_mb(rep.size_bytes)})"
    )
    print(f"kernel: left to the Kaggle image: {', '.join(rep.excluded) or 'nothing'}")
    shape = opts.shape
    print(
        f"kernel: {rep.kernel_dir}: {NOTEBOOK} and kernel-metadata.json (internet off, "
        + (f"GPU {shape} ({MACHINE_SHAPES.get(shape, shape)})" if shape else "GPU off")
        + f", image pinning {opts.docker_image_pinning})"
    )
    if rep.owner_is_placeholder:
        print("kernel: owner is a placeholder: pass --owner (or set KAGGLE_USERNAME) before uploading")
    mode = " --dir-mode zip" if rep.subfolders else ""
    print("upload with the kaggle CLI (internet on this machine):")
    print(
        f"  kaggle datasets create -p {rep.wheels_dir}   # once per wheel set: skip it when {rep.wheels_ref} is "
        "already on Kaggle"
    )
    print(
        f"  kaggle datasets create -p {rep.dataset_dir}{mode}   # later: kaggle datasets version -p "
        f"{rep.dataset_dir}{mode} -m 'new weights'"
    )
    print(f"  kaggle kernels push -p {rep.kernel_dir}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:.0f} MB"
