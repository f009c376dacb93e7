"""The default bundle installs on the Kaggle image's Python (3.12), not only on this one.

`kaggle-tta kernel` builds its wheels for ``kernel.KAGGLE_PYTHON`` by default. This proves it
the way Kaggle would meet it: the demo bundle built with the defaults, both datasets mounted in
a fake /kaggle/input, a fresh CPython 3.12 virtual environment that reaches no package index
and holds only stand-ins for the image's torch and torchvision (tiny wheels made here, named
and versioned as the image's, with no code: real torch is never downloaded), and the notebook's
own cells, up to and including its `pip install --no-index --find-links ...` cell, run in it.
kaggle_tta must then import there. Nothing that needs torch is run (the stand-ins have none).

Wheels for 3.12 come from the wheel cache (``kernel.default_wheel_cache()``); a clean machine
downloads them from the package index once. Skipped, with the reason, where no CPython 3.12 is
installed (pyenv's ``~/.pyenv/versions/3.12*`` or ``python3.12`` on PATH).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from kaggle_tta import kernel
from kaggle_tta.cli import main

REPO = Path(__file__).resolve().parent.parent
# The Kaggle image's pair, as the stand-ins are named: torch 2.10.0+cu128 (Kaggle/kaggle-cli
# #1151, 2026-07-28) and the torchvision released with it. The test checks that every wheel in
# the bundle accepts these versions before using them.
STAND_INS = {"torch": "2.10.0", "torchvision": "0.25.0"}
# What `import kaggle_tta, kaggle_tta.config` imports: installed for real, at the image's versions.
IMPORTED = ["pydantic", "pydantic-core", "typing-extensions", "annotated-types", "typing-inspection", "pyyaml"]


def _find_python312() -> str | None:
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates += [p for p in [shutil.which("python3.12")] if p]
    for c in candidates:
        try:
            done = subprocess.run(
                [c, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == "(3, 12)":
            return c
    return None


PY312 = _find_python312()
pytestmark = pytest.mark.skipif(
    PY312 is None,
    reason="no CPython 3.12 with venv and ensurepip here (looked for ~/.pyenv/versions/3.12*/bin/python3.12 and python3.12 on PATH)",
)


def _stand_in_wheel(dest: Path, name: str, version: str, requires: list[str]) -> Path:
    """A pure wheel ``name-version`` with an empty package: what pip needs to see the image's
    ``name`` installed (RECORD hashes as the wheel spec asks)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'"""A stand-in for the Kaggle image\'s {name}: a name and a version for pip, no code."""\n__version__ = "{version}"\n',
        f"{dist}/METADATA": "".join(
            [
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: stand-in for the Kaggle image's {name}\n",
                *(f"Requires-Dist: {r}\n" for r in requires),
            ]
        ),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: kaggle-tta tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def _clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without its pip configuration (find-links, indexes,
    constraints) or Python paths, and with every network address unreachable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "KAGGLE_")) and not k.lower().endswith("_proxy")
    }
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        PYTHONNOUSERSITE="1",
        http_proxy="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
    )
    env.update(extra)
    return env


def _notebook_runner(path: Path) -> Path:
    """A script running the notebook's code cells in order, up to and including the pip cell
    (the next cell imports kaggle_tta's planner, which needs a real torch)."""
    path.write_text(
        "import json, sys\n"
        "ns = {'__name__': '__main__'}\n"
        "for c in json.load(open(sys.argv[1]))['cells']:\n"
        "    if c['cell_type'] != 'code':\n"
        "        continue\n"
        "    src = ''.join(c['source'])\n"
        "    exec(compile(src, '<cell>', 'exec'), ns)\n"
        '    if \'"pip", "install"\' in src:\n'
        "        break\n"
    )
    return path


@pytest.fixture(scope="session")
def py312_kaggle(tmp_path_factory) -> dict:
    """The demo bundle built with the defaults, mounted in a fake /kaggle, and a CPython 3.12
    venv holding the stand-ins: what the tests below run the notebook against."""
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("py312")
    images = tmp / "test"
    assert main(["demo-data", str(images), "--n", "8"]) == 0
    raw = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    raw["data"]["folder"] = str(images)
    raw["data"]["labels"]["path"] = str(images / "labels.csv")
    for m in raw["members"]:
        m["checkpoint"] = str(REPO / m["checkpoint"])
    pipeline = tmp / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(raw, sort_keys=False))
    opts = kernel.KernelOptions(out=tmp / "kaggle", owner="tester")  # the defaults: Kaggle's Python
    assert opts.python_version == kernel.KAGGLE_PYTHON == "3.12"
    rep = kernel.build_bundle(pipeline, opts)
    t_built = time.perf_counter()

    fake = tmp / "fake-kaggle"
    for d, slug in ((rep.dataset_dir, opts.dataset_slug), (rep.wheels_dir, rep.wheels_ref.split("/")[1])):
        shutil.copytree(d, fake / "input" / "datasets" / "tester" / slug, copy_function=os.link)
    (fake / "working").mkdir()

    stand = tmp / "stand-ins"
    _stand_in_wheel(stand, "torch", STAND_INS["torch"], [])
    _stand_in_wheel(stand, "torchvision", STAND_INS["torchvision"], [f"torch=={STAND_INS['torch']}"])
    # What the lean bundle left to the image, at the image's versions (kernel/kaggle_image.txt):
    # the real wheels of what `import kaggle_tta.config` imports, stand-ins for the rest.
    image = kernel.image.image_packages()
    left = json.loads((rep.dataset_dir / kernel.MANIFEST).read_text())["image_has"]
    real = {n: (image[n], "the image") for n in IMPORTED if n in image}
    fetched = kernel.wheels.fetch_wheels(real, [], kernel.default_wheel_cache(), kernel.resolve_target("3.12"))
    for w in fetched.values():
        shutil.copy2(w, stand / w.name)
    for name in sorted(set(left) - set(real)):
        _stand_in_wheel(stand, name.replace("-", "_"), image[name], [])
    venv = tmp / "venv"
    subprocess.run([PY312, "-m", "venv", str(venv)], check=True, env=_clean_env(), timeout=300)
    python = venv / "bin" / "python"
    pins = [f"{k}=={v}" for k, v in STAND_INS.items()] + [f"{n}=={image[n]}" for n in sorted(set(left) | set(real))]
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--find-links",
            str(stand),
            "--no-compile",
            "--disable-pip-version-check",
            *pins,
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return {"rep": rep, "opts": opts, "fake": fake, "python": python, "tmp": tmp, "t0": t0, "t_built": t_built}


def test_the_bundle_accepts_the_stand_ins(py312_kaggle):
    """Every Requires-Dist on torch or torchvision in the bundle (for 3.12 on Linux) admits the
    stand-ins' versions, so they stand for an image pip would keep."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    rep = py312_kaggle["rep"]
    env = kernel.resolve_target("3.12").env
    checked = 0
    for wheel in [*rep.wheels_dir.glob("*.whl"), *rep.dataset_dir.glob("*.whl")]:
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.name.lower() in STAND_INS and (req.marker is None or req.marker.evaluate({**env, "extra": ""})):
                assert req.specifier.contains(Version(STAND_INS[req.name.lower()]), prereleases=True), (
                    wheel.name,
                    str(req),
                )
                checked += 1
    assert checked >= 2  # kaggle-tta's own (torch, torchvision) at least


def test_the_default_bundle_installs_and_imports_on_kaggles_python(py312_kaggle):
    rep, fake, python = py312_kaggle["rep"], py312_kaggle["fake"], py312_kaggle["python"]
    man = json.loads((rep.dataset_dir / kernel.MANIFEST).read_text())
    assert man["python"] == "3.12" and "CPython 3.12" in man["built_for"]
    wheels = json.loads((rep.wheels_dir / kernel.WHEELS_MANIFEST).read_text())["wheels"]
    assert wheels and all("-py3-none-any" in w or "-cp312-" in w or "abi3" in w for w in wheels), wheels
    assert man["image_has"] and "numpy" in man["image_has"] and "v170" in man["image"]  # lean: left to the image
    assert sum((rep.wheels_dir / w).stat().st_size for w in wheels) < 40e6

    t0 = time.perf_counter()
    runner = _notebook_runner(py312_kaggle["tmp"] / "run_to_pip.py")
    env = _clean_env(
        KAGGLE_INPUT_ROOT=str(fake / "input"),
        KAGGLE_WORKING_DIR=str(fake / "working"),
        KAGGLE_TTA_SCRATCH=str(fake / "scratch"),
    )
    done = subprocess.run(
        [str(python), str(runner), str(rep.kernel_dir / kernel.NOTEBOOK)],
        cwd=fake / "working",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-5000:]
    assert "Successfully installed" in text and f"kaggle-tta-{man['package']['version']}" in text.replace(
        "kaggle_tta-", "kaggle-tta-"
    )
    assert "pip: " in text and "already in the image" in text  # the stand-in torch pair kept, as the image's would be
    imported = subprocess.run(
        [
            str(python),
            "-c",
            "import kaggle_tta, kaggle_tta.config, sys; print(kaggle_tta.__version__, sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=fake / "working",
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.split()[0] == man["package"]["version"] and "(3, 12)" in imported.stdout
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, env=env, timeout=120
    )
    versions = {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}
    assert (
        versions["torch"] == STAND_INS["torch"] and versions["torchvision"] == STAND_INS["torchvision"]
    )  # pip kept the image's pair
    t1 = time.perf_counter()
    print(
        f"\nKaggle-Python proof: bundle {py312_kaggle['t_built'] - py312_kaggle['t0']:.0f}s, venv + stand-ins "
        f"{t0 - py312_kaggle['t_built']:.0f}s, notebook pip cell + import {t1 - t0:.0f}s"
    )


def _notebook_to_pip(py312_kaggle, tmp_path, edit) -> subprocess.CompletedProcess:
    """The bundle mounted in a new fake /kaggle with its manifest changed by ``edit``, and the
    notebook run in the 3.12 venv up to its pip cell."""
    rep, python = py312_kaggle["rep"], py312_kaggle["python"]
    fake = tmp_path / "fake-kaggle"
    bundle = fake / "input" / "kaggle-tta-bundle"
    shutil.copytree(rep.dataset_dir, bundle, copy_function=shutil.copy2)
    shutil.copytree(rep.wheels_dir, fake / "input" / rep.wheels_ref.split("/")[1], copy_function=os.link)
    man = json.loads((bundle / kernel.MANIFEST).read_text())
    edit(man)
    (bundle / kernel.MANIFEST).write_text(json.dumps(man))
    (fake / "working").mkdir()
    env = _clean_env(
        KAGGLE_INPUT_ROOT=str(fake / "input"),
        KAGGLE_WORKING_DIR=str(fake / "working"),
        KAGGLE_TTA_SCRATCH=str(fake / "scratch"),
    )
    return subprocess.run(
        [str(python), str(_notebook_runner(tmp_path / "run_to_pip.py")), str(rep.kernel_dir / kernel.NOTEBOOK)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_bundle_for_another_python_says_so_before_pip(py312_kaggle, tmp_path):
    """A bundle whose wheels are for another Python stops in the notebook with the fix
    (--python-version), not with pip's 'No matching distribution'."""
    done = _notebook_to_pip(
        py312_kaggle, tmp_path, lambda man: man.update(python="3.11", built_for="CPython 3.11 on manylinux x86_64")
    )
    assert done.returncode != 0
    assert "runs Python 3.12, but the wheels" in done.stderr and "--python-version 3.12" in done.stderr, done.stderr[
        -3000:
    ]


def test_an_image_without_what_the_bundle_left_to_it_is_named_before_pip(py312_kaggle, tmp_path):
    """A lean bundle on an image that lacks a package it left out, or has it at a version
    kaggle_tta does not accept: the notebook stops before pip, naming each and the fix."""
    done = _notebook_to_pip(
        py312_kaggle, tmp_path, lambda man: man["image_has"].update({"numba": ">=99", "not-in-any-image": ""})
    )
    assert done.returncode != 0 and "Successfully installed" not in done.stdout
    line = done.stderr.strip().splitlines()[-1]
    image = kernel.image.image_packages()
    assert f"numba: {image['numba']}, needs '>=99'" in line and "not-in-any-image: absent" in line, line
    assert "--wheel-include not-in-any-image --wheel-include numba" in line, line
