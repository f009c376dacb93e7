"""Writing the three folders, from the templates in ``kernels/``: the wheels dataset (the
dependencies' wheels, its manifest, ``dataset-metadata.json``), the dataset (kaggle_tta's
wheel, the files, the rewritten pipeline, the manifest the notebook reads,
``dataset-metadata.json``) and the kernel (the notebook with its parameters cell filled in,
``kernel-metadata.json``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.kernel.image import image_source
from kaggle_tta.kernel.options import MANIFEST, NOTEBOOK, PACKAGE, WHEELS_MANIFEST, KernelError, KernelOptions
from kaggle_tta.kernel.wheels import Target, read_wheel_version, wheel_set_id

if TYPE_CHECKING:
    from kaggle_tta.kernel.bundle import Collector


def wheels_ref(owner: str, opts: KernelOptions, wheels: dict[str, Path]) -> tuple[str, str]:
    """(owner/slug of the wheels dataset, the wheel set's id): the slug is the prefix and the id."""
    set_id = wheel_set_id([w.name for w in wheels.values()])
    return f"{owner}/{opts.wheels_slug_prefix}-{set_id}", set_id


def write_wheels(
    stage: Path,
    owner: str,
    wheels: dict[str, Path],
    excluded: list[str],
    opts: KernelOptions,
    root: Path,
    target: Target,
    image_has: dict[str, str] | None = None,
) -> None:
    """The wheels dataset: the dependencies' wheels (hard-linked from the cache), its manifest
    and ``dataset-metadata.json``. Nothing in it depends on the pipeline or the weights, so a
    new submission with the same dependencies leaves it as it was, slug and all."""
    stage.mkdir(parents=True)
    for w in wheels.values():
        _link_or_copy(w, stage / w.name)
    ref, set_id = wheels_ref(owner, opts, wheels)
    manifest = {
        "format": 1,
        "dataset": ref,
        "wheel_set": set_id,
        "python": target.python,
        "built_for": target.describe(),
        "wheels": sorted(w.name for w in wheels.values()),
        "provided_by_image": excluded,
        "image_has": image_has or {},  # left out: the image's version is accepted (kernel.image)
    }
    (stage / WHEELS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    slug = ref.split("/", 1)[1]
    meta = _template(
        root / "kernels" / "wheels-metadata.json",
        OWNER=owner,
        DATASET_SLUG=slug,
        DATASET_TITLE=_title(slug),
        BUILT_FOR=_short_target(target),
        WHEEL_SET=set_id,
        LICENSE=opts.wheels_license,
    )
    (stage / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_dataset(
    stage: Path,
    col: Collector,
    own: Path,
    wheels: dict[str, Path],
    excluded: list[str],
    opts: KernelOptions,
    root: Path,
    target: Target,
    image_has: dict[str, str] | None = None,
) -> None:
    """The dataset that changes per submission: kaggle_tta's wheel, the collected files
    (copied), the rewritten pipeline, the manifest and ``dataset-metadata.json``. ``wheels``
    (the dependencies') go to the wheels dataset (write_wheels); the manifest names it."""
    import yaml

    stage.mkdir(parents=True)
    _link_or_copy(own, stage / own.name)
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
    (stage / col.pipeline_name).write_text(
        header + yaml.safe_dump(col.raw, sort_keys=False, allow_unicode=True, default_flow_style=None), encoding="utf-8"
    )
    manifest = _dataset_manifest(col, own, wheels, excluded, opts, target, image_has)
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    meta = _template(
        root / "kernels" / "dataset-metadata.json",
        OWNER=col.owner,
        DATASET_SLUG=opts.dataset_slug,
        DATASET_TITLE=_title(opts.dataset_slug),
        WHEELS_REF=manifest["wheels_dataset"],
        LICENSE=opts.license,
    )
    (stage / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _dataset_manifest(
    col: Collector,
    own: Path,
    wheels: dict[str, Path],
    excluded: list[str],
    opts: KernelOptions,
    target: Target,
    image_has: dict[str, str] | None,
) -> dict[str, Any]:
    """``kaggle_tta_bundle.json``: what the notebook reads of the bundle."""
    ref, set_id = wheels_ref(col.owner, opts, wheels)
    return {
        "format": 2,
        "pipeline": col.pipeline_name,
        "dataset": f"{col.owner}/{opts.dataset_slug}",
        "package": {"name": PACKAGE, "version": read_wheel_version(own), "wheel": own.name},
        "wheels_dataset": ref,
        "wheel_set": set_id,
        "wheels": sorted(w.name for w in wheels.values()),
        "provided_by_image": excluded,
        "image_has": image_has or {},  # left out: the notebook checks the image's version first
        "image": image_source(),
        "python": target.python,
        "built_for": target.describe(),
        "competition": opts.competition,
        "competition_paths": col.competition_paths,
        "bundled_paths": col.bundled_paths,
        "code_dirs": ["code"] if col.code_modules else [],
    }


def write_kernel(stage: Path, col: Collector, opts: KernelOptions, root: Path, wheels_dataset: str) -> None:
    """The kernel folder: the notebook with its parameters cell filled in, ``kernel-metadata.json``
    with the internet off written out (Kaggle's API turns it on when the key is absent), both
    datasets attached, and with the GPU on, the machine and the image pinned (see options)."""
    stage.mkdir(parents=True)
    nb = json.loads((root / "kernels" / NOTEBOOK).read_text(encoding="utf-8"))
    values = {
        "DATASET_SLUG": opts.dataset_slug,
        "PIPELINE": col.pipeline_name,
        "COMPETITION": opts.competition or "",
        "SERVE": opts.serve or "",
        "TIME_LIMIT_HOURS": float(opts.time_limit_hours),
    }
    cell = next(
        (c for c in nb["cells"] if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])),
        None,
    )
    if cell is None:
        raise KernelError(f"kernels/{NOTEBOOK}: no code cell tagged 'parameters'; restore the template")
    src = "".join(cell["source"])
    for name, value in values.items():

        def assign(m: re.Match[str], v: Any = value, k: str = name) -> str:
            return f"{k} = {_py_literal(v)}{m.group(1) or ''}"

        src, n = re.subn(
            rf"^{name} = .*?(\s+#.*)?$",
            assign,
            src,
            count=1,
            flags=re.M,
        )
        if n != 1:
            raise KernelError(
                f"kernels/{NOTEBOOK}: the parameters cell has no '{name} = ...' line; restore the template"
            )
    cell["source"] = src.splitlines(keepends=True)
    (stage / NOTEBOOK).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    meta = _template(
        root / "kernels" / "kernel-metadata.json",
        OWNER=col.owner,
        KERNEL_SLUG=opts.kernel_slug,
        KERNEL_TITLE=_title(opts.kernel_slug),
    )
    meta.update(
        code_file=NOTEBOOK,
        language="python",
        kernel_type="notebook",
        enable_gpu=opts.gpu,
        enable_internet=False,
        dataset_sources=[wheels_dataset, f"{col.owner}/{opts.dataset_slug}"],
        competition_sources=[opts.competition] if opts.competition else [],
        model_sources=list(col.model_sources),
        docker_image_pinning_type=opts.docker_image_pinning,
    )
    if opts.shape is not None:
        meta["machine_shape"] = opts.shape
    else:
        meta.pop("machine_shape", None)
    (stage / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _short_target(target: Target) -> str:
    """The target in a dataset subtitle (20-80 characters)."""
    import sys

    return (
        f"CPython {target.python} (manylinux x86_64)"
        if target.python_version
        else f"CPython {target.python} ({sys.platform})"
    )


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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
