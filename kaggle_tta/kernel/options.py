"""What ``kaggle-tta kernel`` is asked to build, what it reports, and its error."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_tta.errors import KaggleTTAError

NOTEBOOK = "kaggle_tta_inference.ipynb"
MANIFEST = "kaggle_tta_bundle.json"
PACKAGE = "kaggle-tta"
# Left to the Kaggle image (fnmatch patterns on normalized distribution names).
DEFAULT_EXCLUDES = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton*", "nvidia-*", "cuda-*")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$")


class KernelError(KaggleTTAError):
    """The offline bundle cannot be built: a file, an option or a dependency wheel."""


def default_wheel_cache() -> Path:
    """``$KAGGLE_TTA_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/kaggle-tta/wheels`` (``~/.cache``)."""
    if os.environ.get("KAGGLE_TTA_WHEEL_CACHE"):
        return Path(os.environ["KAGGLE_TTA_WHEEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kaggle-tta" / "wheels"


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


def check_options(opts: KernelOptions) -> None:
    """Raises KernelError naming the first malformed option (slugs, owner, limits, versions)."""
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
