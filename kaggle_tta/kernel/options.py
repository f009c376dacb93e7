"""What ``kaggle-tta kernel`` is asked to build, what it reports, and its error."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kaggle_tta.config.errors import KaggleTTAError

NOTEBOOK = "kaggle_tta_inference.ipynb"
MANIFEST = "kaggle_tta_bundle.json"
PACKAGE = "kaggle-tta"
# Left to the Kaggle image (fnmatch patterns on normalized distribution names).
DEFAULT_EXCLUDES = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton*", "nvidia-*", "cuda-*")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{4,48}[a-z0-9]$")
WHEELS_MANIFEST = "kaggle_tta_wheels.json"  # at the top of the wheels dataset

# The Python of Kaggle's notebook image, which the wheels are built for by default. Source:
# Kaggle/docker-python pull request #1496 "Python 3.12 bump" (merged); the image then ships
# torch 2.10.0+cu128 (Kaggle/kaggle-cli issue #1151, 2026-07-28). Checked 2026-12-01. When
# Kaggle moves its image on, change this (or pass --python-version X.Y).
KAGGLE_PYTHON = "3.12"

# kernel-metadata.json's machine_shape, as Kaggle names its accelerators (Kaggle/kaggle-cli
# docs/kernels.md "Accelerators available as of Sep 2026", and pull request #1198,
# 2026-09-17: NvidiaTeslaT4 is the editor's "GPU T4 x2", the default GPU; a single T4 is not
# offered). Without machine_shape a pushed GPU kernel lands on a P100 (kaggle-cli #490, #821).
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"
MACHINE_SHAPES = {
    "NvidiaTeslaT4": "GPU T4 x2 (Kaggle's default GPU)",
    "NvidiaL4": "GPU L4",
    "NvidiaL4X1": "GPU L4 x1",
    "NvidiaTeslaA100": "GPU A100 (some competitions only)",
    "NvidiaH100": "GPU H100 (some competitions only)",
    "NvidiaRtxPro6000": "GPU RTX Pro 6000 (some competitions only)",
}
# Names Kaggle knows that this bundle cannot use, and why.
REFUSED_MACHINE_SHAPES = {
    "NvidiaTeslaP100": (
        "the image's torch (cu128) has no kernels for the P100's sm_60, so every CUDA operation fails "
        "(Kaggle/kaggle-cli #1151, #1156)"
    ),
    "NvidiaTeslaT4Highmem": "an internal pool for Kaggle admins (Kaggle/kaggle-cli #1198); GPU T4 x2 is NvidiaTeslaT4",
    "TpuV5E8": "a TPU: kaggle-tta runs torch on CUDA or the CPU (leave the GPU off to run on the CPU)",
    "TpuV6E8": "a TPU: kaggle-tta runs torch on CUDA or the CPU (leave the GPU off to run on the CPU)",
    "Tpu1VmV38": "a TPU: kaggle-tta runs torch on CUDA or the CPU (leave the GPU off to run on the CPU)",
}

# kernel-metadata.json's docker_image_pinning_type: the values the kaggle CLI accepts
# (kaggle_api_extended.py, valid_push_pinning_types). "original" keeps running new versions
# in the image the kernel was first run in; "latest" moves each new version to the newest
# image, whose Python and torch may no longer match the wheels the bundle was built for.
PINNING_TYPES = ("original", "latest")
DEFAULT_PINNING = "original"

# dataset-metadata.json's licenses[0].name: the names Kaggle accepts (Kaggle/kaggle-cli
# docs/datasets_metadata.md, "Licenses"). Defaults: the wheels are third-party software, each
# under its own project's licence ("other", said in the description); the weights and the
# pipeline are the user's ("copyright-authors": data files (c) the original authors). Not CC0:
# that would put someone else's wheels, or the user's weights, in the public domain.
DATASET_LICENSES = (
    "CC0-1.0",
    "CC-BY-SA-3.0",
    "CC-BY-SA-4.0",
    "CC-BY-NC-SA-4.0",
    "GPL-2.0",
    "ODbL-1.0",
    "DbCL-1.0",
    "copyright-authors",
    "other",
    "unknown",
    "CC-BY-4.0",
    "CC-BY-NC-4.0",
    "PDDL",
    "CC-BY-3.0",
    "CC-BY-3.0-IGO",
    "US-Government-Works",
    "CC-BY-NC-SA-3.0-IGO",
    "CDLA-Permissive-1.0",
    "CDLA-Sharing-1.0",
    "CC-BY-ND-4.0",
    "CC-BY-NC-ND-4.0",
    "ODC-BY-1.0",
    "LGPL-3.0",
    "AGPL-3.0",
    "FDL-1.3",
    "EU-ODP-Legal-Notice",
    "apache-2.0",
    "GPL-3.0",
)
DEFAULT_LICENSE = "copyright-authors"
DEFAULT_WHEELS_LICENSE = "other"


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
    enable_gpu: bool | None = None
    """None: on when ``machine_shape`` is given."""
    machine_shape: str | None = None
    """None: ``DEFAULT_MACHINE_SHAPE`` when the GPU is on."""
    docker_image_pinning: str = DEFAULT_PINNING
    license: str = DEFAULT_LICENSE
    wheels_license: str = DEFAULT_WHEELS_LICENSE
    wheels_slug_prefix: str = "kaggle-tta-wheels"
    time_limit_hours: float = 9.0
    wheel_exclude: list[str] = field(default_factory=list)
    serve: str | None = None
    """A code competition's inference server, ``module:Class``: the notebook serves predictions
    through it (kaggle_tta.kernel.serving) instead of running the test set."""
    lean: bool = True
    """Leave out the wheels of what the Kaggle image has at an accepted version (kernel.image)."""
    wheel_include: list[str] = field(default_factory=list)
    """Bundled even where the image has them (a lean bundle's notebook names these when the image differs)."""
    extra_wheels: list[str] = field(default_factory=list)
    wheel_cache: Path | None = field(default_factory=default_wheel_cache)
    python_version: str | None = KAGGLE_PYTHON
    """CPython X.Y on Kaggle's platform; None: this interpreter."""

    @property
    def gpu(self) -> bool:
        return bool(self.enable_gpu) if self.enable_gpu is not None else self.machine_shape is not None

    @property
    def shape(self) -> str | None:
        """The machine_shape written: the one asked for, the default with the GPU on, else none."""
        return (self.machine_shape or DEFAULT_MACHINE_SHAPE) if self.gpu else None


@dataclass
class BundleReport:
    """What was written: the three folders and a summary for the user."""

    dataset_dir: Path
    kernel_dir: Path
    wheels: list[str]
    """Every wheel: kaggle_tta's (in the dataset) and the dependencies' (in the wheels dataset)."""
    excluded: list[str]
    files: list[str]
    subfolders: list[str]
    owner_is_placeholder: bool
    size_bytes: int
    """The dataset (weights, pipeline, kaggle_tta's wheel): what changes per submission."""
    wheels_dir: Path
    wheels_ref: str
    """owner/slug of the wheels dataset; the slug names the wheel set."""
    wheels_size_bytes: int
    wheels_unchanged: bool
    """The wheels folder held this same wheel set before this build."""


def check_options(opts: KernelOptions) -> None:
    """Raises KernelError naming the first malformed option (slugs, owner, limits, versions)."""
    for flag, slug in (("--dataset-slug", opts.dataset_slug), ("--kernel-slug", opts.kernel_slug)):
        if not _SLUG.match(slug):
            raise KernelError(
                f"{flag} '{slug}': use 6-50 lowercase letters, digits and hyphens (the title made from it must "
                "have 6 or more characters)"
            )
    if opts.competition is not None and not re.match(r"^[a-z0-9][a-z0-9-]*$", opts.competition):
        raise KernelError(
            f"--competition '{opts.competition}': give the competition's slug as in its URL, e.g. 'titanic'"
        )
    if opts.owner is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", opts.owner):
        raise KernelError(f"--owner '{opts.owner}': give your Kaggle user name")
    if opts.serve is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", opts.serve):
        raise KernelError(
            f"--serve '{opts.serve}': give the inference server as module:Class, e.g. "
            "kaggle_evaluation.foo_inference_server:FooInferenceServer"
        )
    if not opts.time_limit_hours > 0:
        raise KernelError(
            f"--time-limit-hours {opts.time_limit_hours}: must be positive (Kaggle notebooks: 9 for most competitions)"
        )
    if opts.data_root is not None and opts.competition is None:
        raise KernelError(
            "--data-root maps data paths onto a competition's folder on Kaggle: give --competition SLUG too"
        )
    if opts.data_root is not None and not opts.data_root.is_dir():
        raise KernelError(f"--data-root {opts.data_root}: not a folder; give the local copy of the competition data")
    if opts.python_version is not None and not re.match(r"^3\.\d{1,2}$", opts.python_version):
        raise KernelError(
            f"--python-version '{opts.python_version}': give a CPython version like {KAGGLE_PYTHON} (Kaggle's image)"
        )
    if not _SLUG.match(f"{opts.wheels_slug_prefix}-0123456789"):
        raise KernelError(
            f"--wheels-slug-prefix '{opts.wheels_slug_prefix}': use 5-39 lowercase letters, digits and hyphens "
            "(11 more name the wheel set)"
        )
    if opts.machine_shape is not None:
        _check_shape(opts.machine_shape)
        if opts.enable_gpu is False:
            raise KernelError(
                f"--machine-shape {opts.machine_shape} asks for a GPU, but --no-enable-gpu turns it off; drop one "
                "of them"
            )
    _check_choice("--docker-image-pinning", opts.docker_image_pinning, PINNING_TYPES)
    _check_choice("--license", opts.license, DATASET_LICENSES)
    _check_choice("--wheels-license", opts.wheels_license, DATASET_LICENSES)


def _did_you_mean(value: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6) or difflib.get_close_matches(
        value.lower(), [k.lower() for k in known], n=1, cutoff=0.6
    )
    if not close:
        return ""
    hit = next(k for k in known if k.lower() == close[0].lower())
    return f" — did you mean '{hit}'?"


def _check_choice(flag: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise KernelError(
            f"{flag} '{value}': not a value Kaggle accepts{_did_you_mean(value, known)} (one of: {', '.join(known)})"
        )


def _check_shape(shape: str) -> None:
    if shape in REFUSED_MACHINE_SHAPES:
        raise KernelError(
            f"--machine-shape {shape}: {REFUSED_MACHINE_SHAPES[shape]}; use {DEFAULT_MACHINE_SHAPE} "
            f"({MACHINE_SHAPES[DEFAULT_MACHINE_SHAPE]})"
        )
    if shape not in MACHINE_SHAPES:
        known = ", ".join(f"{k} ({v})" for k, v in MACHINE_SHAPES.items())
        raise KernelError(
            f"--machine-shape '{shape}': not an accelerator Kaggle "
            f"names{_did_you_mean(shape, [*MACHINE_SHAPES, *REFUSED_MACHINE_SHAPES])}; one of: {known}"
        )
