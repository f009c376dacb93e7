"""The wheels a bundle ships: which versions (the installed closure of kaggle_tta's
requirements), for which interpreter, found in the wheel cache or fetched with pip, and the
wheel of kaggle_tta itself built from the checkout.

The dependency wheels are the versions installed here (the environment the pipeline was tested
in): the installed metadata is walked from kaggle_tta's requirements, without descending into
the excluded packages (torch, torchvision, CUDA and triton: the Kaggle image has them).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kaggle_tta.kernel.options import KernelError

# Kaggle's image is Ubuntu 22.04 on x86_64 (glibc 2.35): used with --python-version.
_KAGGLE_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
_PIP_MISSING = re.compile(r"(?:No matching distribution found for|satisfies the requirement) ([A-Za-z0-9_.\-]+)==")


@dataclass
class Target:
    """The interpreter the wheels are for: this one, or CPython X.Y on Kaggle's platform."""

    python_version: str | None
    tags: list[Any]
    env: dict[str, str]
    pip_args: list[str]

    @property
    def python(self) -> str:
        """X.Y of the interpreter the wheels are for (the notebook checks its own against it)."""
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    def describe(self) -> str:
        if self.python_version is None:
            return f"this interpreter (CPython {self.python}, {sys.platform})"
        return f"CPython {self.python_version} on manylinux x86_64"


def resolve_target(python_version: str | None) -> Target:
    """The target for ``--python-version``: None is this interpreter, with the tags and markers
    pip sees here, and so is this interpreter's own X.Y on Linux x86_64 (where its wheels are
    Kaggle's too, and a dependency with only an sdist can be built here); another X.Y, or any
    X.Y elsewhere (a Mac), is CPython on Kaggle's manylinux x86_64."""
    import platform

    from packaging import tags
    from packaging.markers import default_environment

    env = cast(dict[str, str], dict(default_environment()))  # packaging types the values as object
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    like_kaggle = sys.platform == "linux" and platform.machine() == "x86_64" and sys.implementation.name == "cpython"
    if python_version is None or (python_version == local and like_kaggle):
        return Target(None, list(tags.sys_tags()), env, [])
    ver = tuple(int(x) for x in python_version.split("."))
    tag_list = list(tags.cpython_tags(ver, platforms=_KAGGLE_PLATFORMS)) + list(
        tags.compatible_tags(ver, f"cp{ver[0]}{ver[1]}", _KAGGLE_PLATFORMS)
    )
    env.update(
        python_version=python_version,
        python_full_version=f"{python_version}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
    )
    args = ["--python-version", python_version, "--implementation", "cp"] + [
        a for p in _KAGGLE_PLATFORMS for a in ("--platform", p)
    ]
    return Target(python_version, tag_list, env, args)


def wheel_set_id(wheels: list[str]) -> str:
    """Names a set of wheels: the first 10 hex digits of the sha256 of their sorted file names
    (a file name pins the distribution, its version and the interpreter and platform it is
    for). The same set gets the same id, so the wheels dataset named by it keeps its slug."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(wheels)).encode()).hexdigest()[:10]


def build_own_wheel(root: Path, dest: Path) -> Path:
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


def read_wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode("utf-8"))
    return meta.get_all("Requires-Dist") or []


def read_wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name."""
    from packaging.utils import parse_wheel_filename

    return str(parse_wheel_filename(wheel.name)[1])


def pin_closure(
    roots: list[tuple[str, str]], excludes: list[str], target: Target, specs: dict[str, str] | None = None
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Walks the installed metadata from ``roots`` ((requirement, who asks)): normalized name ->
    (version, required by).

    Returns the pins and the excluded names that were reached (the Kaggle image must have them);
    ``specs`` receives, per pinned name, every requirement on it that applies, joined (what
    another version must satisfy to stand in for the pin: kaggle_tta.kernel.image).
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

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
            raise KernelError(
                f"wheels: '{text}' (from {parent}) is not a requirement; give a distribution name"
            ) from None
        if req.marker is not None and not any(
            req.marker.evaluate({**target.env, "extra": e}) for e in ["", *parent_extras]
        ):
            continue
        name = canonicalize_name(req.name)
        if specs is not None:  # excluded names too: what the image's version must satisfy
            specs[name] = str(SpecifierSet(specs.get(name, "")) & req.specifier)
        if any(fnmatch.fnmatch(name, pat) for pat in excludes):
            excluded.add(name)
            continue
        key = (name, frozenset(canonicalize_name(e) for e in req.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = _installed(req, name, parent)
        pins.setdefault(name, (dist.version, parent))
        for sub in reversed(dist.requires or []):
            stack.append((sub, name, key[1]))
    return pins, sorted(excluded)


def _installed(req: Any, name: str, parent: str) -> Any:
    """The installed distribution ``req`` names, at a version ``req`` accepts (else one line)."""
    import importlib.metadata as md

    from packaging.version import InvalidVersion, Version

    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        raise KernelError(
            f"wheels: {req.name} (required by {parent}) is not installed here, so which version to bundle is "
            "unknown; "
            f"pip install '{req}' or add '{name}' to --wheel-exclude if the Kaggle image has it"
        ) from None
    try:
        ok = req.specifier.contains(Version(dist.version), prereleases=True)
    except InvalidVersion:
        ok = True
    if not ok:
        raise KernelError(
            f"wheels: {name} {dist.version} is installed here but {parent} needs '{req}'; pip install '{req}' "
            "and rebuild"
        )
    return dist


def _index_wheels(folders: list[Path], target: Target) -> dict[tuple[str, str], Path]:
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


def fetch_wheels(
    pins: dict[str, tuple[str, str]], folders: list[Path], download_to: Path, target: Target
) -> dict[str, Path]:
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
                raise KernelError(
                    f"wheels: pip fetched {n}=={pins[n][0]}, but no wheel for {target.describe()} is in "
                    f"{download_to}; delete it and rebuild"
                )
            break
        bad = _failed_requirement(res, missing)
        if bad is None:
            raise KernelError(
                f"wheels: pip download failed: {_pip_error(res)}; check the network access to the package index "
                "and rebuild"
            )
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
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True
    )


def _pip_error(res: subprocess.CompletedProcess) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.stderr or res.stdout)  # pip colours its errors on some terminals
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors[-1] if errors else lines[-1] if lines else f"exit status {res.returncode}")[:300]
