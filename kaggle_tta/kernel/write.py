"""Writing the two folders: the dataset (files, the rewritten pipeline, the manifest the
notebook reads, ``dataset-metadata.json``) and the kernel (the notebook with its parameters
cell filled in, ``kernel-metadata.json``), both from the templates in ``kernels/``."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_tta.kernel.options import MANIFEST, NOTEBOOK, PACKAGE, KernelError, KernelOptions
from kaggle_tta.kernel.wheels import Target, read_wheel_version

if TYPE_CHECKING:
    from kaggle_tta.kernel.bundle import Collector


def write_dataset(
    stage: Path, col: Collector, own: Path, wheels: dict[str, Path], excluded: list[str], opts: KernelOptions, root: Path, target: Target
) -> None:
    """The dataset folder: wheels (hard-linked), the collected files (copied), the rewritten
    pipeline, the manifest and ``dataset-metadata.json``."""
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
        "package": {"name": PACKAGE, "version": read_wheel_version(own), "wheel": own.name},
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


def write_kernel(stage: Path, col: Collector, opts: KernelOptions, root: Path) -> None:
    """The kernel folder: the notebook with its parameters cell filled in, ``kernel-metadata.json``
    with the internet off written out (Kaggle's API turns it on when the key is absent)."""
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

def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
