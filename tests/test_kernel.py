"""The offline Kaggle bundle (`kaggle-tta kernel`) and its notebook.

The proof test builds the bundle for the demo pipeline, makes a fresh virtual environment that
reaches no package index and sees torch/torchvision (and the Jupyter kernel) the way a Kaggle
image has them preinstalled, lays out a fake /kaggle/input and /kaggle/working, executes the
notebook there, and checks its submission against `kaggle-tta run` on the same images.

Wheels are cached in the wheel cache (default ~/.cache/kaggle-tta/wheels, or
$KAGGLE_TTA_WHEEL_CACHE): the first run on a clean machine downloads them from the package index.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kaggle_tta import kernel
from kaggle_tta.cli import main
from kaggle_tta.config import load_pipeline
from kaggle_tta.errors import KaggleTTAError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "kernels" / kernel.NOTEBOOK
N_DEMO = 24
# What a Kaggle image has preinstalled, for the test's virtual environment: torch and torchvision
# (with their dependencies), the Jupyter kernel and pip. Everything else must come from the bundle.
IMAGE_DISTS = ["torch", "torchvision", "ipykernel", "pip"]
FROM_BUNDLE = ["timm", "albumentations", "polars", "ensemble_boxes", "cv2", "pydantic", "safetensors", "yaml", "tqdm"]


# ---- helpers ---------------------------------------------------------------------------------


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _demo_pipeline(tmp: Path, images: Path, **runtime) -> Path:
    """pipeline.yaml of the repository, pointed at ``images`` and at ``tmp``."""
    raw = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    raw["data"]["folder"] = str(images)
    raw["data"]["labels"]["path"] = str(images / "labels.csv")
    for m in raw["members"]:
        m["checkpoint"] = str(REPO / m["checkpoint"])
    raw["runtime"].update(runtime)
    raw["cache"]["dir"] = str(tmp / "cache")
    raw["submission"]["path"] = str(tmp / "reference" / "submission.csv")
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernel-demo") / "test"
    assert main(["demo-data", str(out), "--n", str(N_DEMO)]) == 0
    return out


def _image_site(dest: Path) -> Path:
    """A folder of symlinks to the system's copies of IMAGE_DISTS and their dependencies only."""
    dest.mkdir()
    pins, _ = kernel._pin_closure(IMAGE_DISTS, [], kernel._Target.of(None))  # extras and markers as pip sees them
    for dist in map(md.distribution, pins):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        if not tops:
            tops = set((dist.read_text("top_level.txt") or "").split())
        for top in tops - {"__pycache__"}:
            src = base / top
            if not (dest / top).exists() and (src.exists() or src.with_suffix(".py").exists()):
                (dest / top).symlink_to(src if src.exists() else src.with_suffix(".py"))
    return dest


def _venv(path: Path, image_site: Path) -> Path:
    """A fresh virtual environment whose only packages are those of the fake image (pip too: the
    venv's own setuptools would shadow the one torch needs)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "kaggle_image.pth").write_text(f"{image_site}\n")
    return python


def _offline_env(monkeypatch, kaggle: Path) -> dict[str, str]:
    """The notebook's environment: the fake Kaggle folders, no pip configuration, no network."""
    for key in list(os.environ):
        if key.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV", "JUPYTER", "KAGGLE_")) or key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    env = {
        "KAGGLE_INPUT_ROOT": str(kaggle / "input"),
        "KAGGLE_WORKING_DIR": str(kaggle / "working"),
        "PIP_CONFIG_FILE": os.devnull,  # no find-links, index or constraints from this machine
        "PIP_NO_INDEX": "1",
        "http_proxy": "http://127.0.0.1:9",  # a package index would be unreachable anyway
        "https_proxy": "http://127.0.0.1:9",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _execute(notebook: Path, python: Path, working: Path, env: dict[str, str], tmp: Path, monkeypatch) -> str:
    """Executes the notebook with ``python``; returns the text of its outputs.

    With nbclient, through a Jupyter kernel whose spec runs ``python``; without it, the code
    cells in order in one ``python`` process (the notebook uses no IPython magic).
    """
    try:
        import nbclient
        import nbformat
    except ImportError:
        nbclient = None
    if nbclient is not None:
        spec = tmp / "jupyter" / "kernels" / "kaggle-image"
        spec.mkdir(parents=True)
        argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "kaggle image", "language": "python", "env": env}))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "jupyter" / "runtime"))
        nb = nbformat.read(notebook, as_version=4)
        nbclient.NotebookClient(nb, kernel_name="kaggle-image", timeout=900, resources={"metadata": {"path": str(working)}}).execute()
        texts = []
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                texts.append(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")))
        return "".join(texts)
    runner = tmp / "run_cells.py"
    runner.write_text(
        "import json, sys\n"
        "ns = {'__name__': '__main__'}\n"
        "for c in json.load(open(sys.argv[1]))['cells']:\n"
        "    if c['cell_type'] == 'code':\n"
        "        exec(compile(''.join(c['source']), '<cell>', 'exec'), ns)\n"
    )
    done = subprocess.run([str(python), str(runner), str(notebook)], cwd=working, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


def _tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))}


# ---- the proof: the notebook runs offline from the bundle ----------------------------------------


def test_notebook_runs_offline_from_the_bundle_and_matches_kaggle_tta_run(demo_images, tmp_path, monkeypatch, capsys):
    # batch_size 8: the timing pass (two batches, 16 images) is smaller than the test set (24).
    pipeline = _demo_pipeline(tmp_path, demo_images, batch_size=8, workers=0)
    out = tmp_path / "kaggle"
    code, stdout, err = _run(capsys, "kernel", str(pipeline), "--out", str(out), "--owner", "tester", "--dataset-slug", "tta-bundle-test", "--time-limit-hours", "2")
    assert code == 0, err
    assert "left to the Kaggle image: torch, torchvision" in stdout

    dataset, kdir = out / "dataset", out / "kernel"
    man = json.loads((dataset / kernel.MANIFEST).read_text())
    wheels = {w.split("-")[0].lower() for w in man["wheels"]}
    assert {"timm", "albumentations", "polars", "ensemble_boxes", "opencv_python_headless", "pydantic"} <= wheels
    assert not wheels & {"torch", "torchvision", "triton"} and not any(w.startswith(("nvidia", "cuda")) for w in wheels)
    assert (dataset / man["package"]["wheel"]).is_file() and all((dataset / w).is_file() for w in man["wheels"])
    assert sorted(p.name for p in dataset.glob("*.safetensors")) == ["test_efficientnet.safetensors", "test_resnet.safetensors"]
    assert len(list((dataset / "data" / "test").glob("*.png"))) == N_DEMO  # no competition: the test images are bundled
    rewritten = yaml.safe_load((dataset / "pipeline.yaml").read_text())
    assert rewritten["data"]["folder"] == "data/test" and rewritten["members"][0]["checkpoint"] == "test_resnet.safetensors"
    meta = json.loads((kdir / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["enable_gpu"] is False
    assert meta["dataset_sources"] == ["tester/tta-bundle-test"] and meta["competition_sources"] == []
    assert meta["kernel_type"] == "notebook" and (kdir / meta["code_file"]).is_file()
    assert json.loads((dataset / "dataset-metadata.json").read_text())["id"] == "tester/tta-bundle-test"

    # Kaggle's side: the dataset mounted as /kaggle/input/datasets/<owner>/<slug>, an empty working folder.
    kaggle = tmp_path / "fake-kaggle"
    mount = kaggle / "input" / "datasets" / "tester" / "tta-bundle-test"
    shutil.copytree(dataset, mount, copy_function=os.link)
    (kaggle / "input" / "some-other-dataset").mkdir()
    working = kaggle / "working"
    working.mkdir()
    before = _tree(kaggle / "input")
    python = _venv(tmp_path / "venv", _image_site(tmp_path / "image-site"))
    env = _offline_env(monkeypatch, kaggle)
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])", "kaggle_tta", *FROM_BUNDLE], capture_output=True, text=True, cwd=working)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # before the notebook: only the image's packages

    text = _execute(kdir / kernel.NOTEBOOK, python, working, env, tmp_path, monkeypatch)
    (tmp_path / "notebook-output.txt").write_text(text)  # kept by pytest for a look after a failure

    assert re.search(r"estimate: inference on 24 images ~ \d+:\d\d:\d\d; the notebook ~ .* of the 2 h limit", text), text[-3000:]
    assert "pip:" in text and "Successfully installed" in text and "timm-" in text
    where = subprocess.run([str(python), "-c", "import sys, importlib; print('\\n'.join(importlib.import_module(m).__file__ for m in sys.argv[1:]))", "kaggle_tta", *FROM_BUNDLE, "torch"], capture_output=True, text=True, cwd=working)
    files = where.stdout.split()
    assert where.returncode == 0 and len(files) == len(FROM_BUNDLE) + 2, where.stderr
    venv_site = str((tmp_path / "venv").resolve())
    assert all(f.startswith(venv_site) for f in files[:-1]), files  # installed from the bundle's wheels
    assert files[-1].startswith(str(tmp_path / "image-site")), files  # torch: the image's
    assert _tree(kaggle / "input") == before  # the input stays read-only
    assert not (working / ".kaggle_tta").exists()  # cache removed (KEEP_CACHE False)

    # The same pipeline and images through `kaggle-tta run` give the same submission.
    monkeypatch.undo()
    code, _, err = _run(capsys, "run", str(pipeline), "-q")
    assert code == 0, err
    ours = (working / "submission.csv").read_text()
    assert ours == (tmp_path / "reference" / "submission.csv").read_text()
    assert len(ours.splitlines()) == N_DEMO + 1


# ---- checks before anything is written ---------------------------------------------------------


def test_missing_checkpoint_fails_before_writing(demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, demo_images)
    raw = yaml.safe_load(pipeline.read_text())
    raw["members"][1]["checkpoint"] = str(tmp_path / "gone.safetensors")
    pipeline.write_text(yaml.safe_dump(raw))
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"))
    assert code == 2 and "members.effnet.checkpoint" in err and "gone.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_dependency_without_a_wheel_fails_naming_it(demo_images, tmp_path, monkeypatch, capsys):
    pipeline = _demo_pipeline(tmp_path, demo_images)
    empty = tmp_path / "no-index"
    empty.mkdir()
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing: as if no wheel existed anywhere
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--wheel-cache", str(empty))
    assert code == 2 and re.search(r"no wheel of [a-z0-9_.-]+==\S+ \(required by [a-z0-9_.-]+\)", err), err
    assert "--wheel-exclude" in err
    assert not (tmp_path / "out").exists()


def test_dependency_not_installed_here_fails_naming_it(demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, demo_images)
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--extra-wheel", "surely-not-installed-dist")
    assert code == 2 and "surely-not-installed-dist" in err and "not installed here" in err
    assert not (tmp_path / "out").exists()


def test_competition_data_must_come_from_the_competition(demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, demo_images)
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--competition", "some-comp")
    assert code == 2 and "data.folder" in err and "--data-root" in err
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path))
    assert code == 2 and "--competition" in err
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--dataset-slug", "Bad_Slug")
    assert code == 2 and "--dataset-slug" in err
    assert not (tmp_path / "out").exists()


def _collect(pipeline: Path, **opts) -> kernel._Collector:
    cfg = load_pipeline(pipeline)
    col = kernel._Collector(cfg, yaml.safe_load(pipeline.read_text()), kernel.KernelOptions(out=pipeline.parent / "out", **opts), pipeline.name)
    col.collect()
    return col


def test_data_under_data_root_is_read_from_the_competition(demo_images, tmp_path):
    col = _collect(_demo_pipeline(tmp_path, demo_images), competition="shapes-comp", data_root=demo_images.parent)
    assert col.raw["data"]["folder"] == "/kaggle/input/shapes-comp/test"
    assert col.competition_paths == [
        {"key": "data.folder", "path": "test", "kind": "dir", "optional": False},
        {"key": "data.labels.path", "path": "test/labels.csv", "kind": "file", "optional": True},
    ]
    assert not col.trees and not col.tree_files  # the test data is not bundled
    assert sorted(col.files) == ["test_efficientnet.safetensors", "test_resnet.safetensors"]
    assert col.raw["cache"]["dir"].startswith("/kaggle/working/") and col.raw["submission"]["path"] == "/kaggle/working/submission.csv"


def test_kaggle_paths_and_clashing_names(demo_images, tmp_path):
    pipeline = _demo_pipeline(tmp_path, demo_images)
    raw = yaml.safe_load(pipeline.read_text())
    raw["data"]["folder"] = "/kaggle/input/competitions/shapes-comp/test_images"
    del raw["data"]["labels"]
    other = tmp_path / "fold1"
    other.mkdir()
    shutil.copy(REPO / raw["members"][0]["checkpoint"], other / "test_efficientnet.safetensors")
    raw["members"][0]["checkpoint"] = str(other / "test_efficientnet.safetensors")  # same file name, other file
    pipeline.write_text(yaml.safe_dump(raw))
    col = _collect(pipeline, competition="shapes-comp")
    assert col.competition_paths == [{"key": "data.folder", "path": "test_images", "kind": "dir", "optional": False}]
    names = [m["checkpoint"] for m in col.raw["members"]]
    assert len(set(names)) == 2 and "test_efficientnet.safetensors" in names


def test_notebook_template_is_a_papermill_notebook_without_magics():
    nb = json.loads(TEMPLATE.read_text())
    assert nb["nbformat"] == 4
    try:
        import nbformat
    except ImportError:
        pass
    else:
        nbformat.validate(nbformat.reads(TEMPLATE.read_text(), as_version=4))
    code_cells = [{**c, "source": "".join(c["source"])} for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code_cells[0]["metadata"].get("tags", [])
    params: dict = {}
    exec(code_cells[0]["source"], params)
    assert params["TIME_LIMIT_HOURS"] == 9.0 and {"DATASET_SLUG", "PIPELINE", "COMPETITION"} <= set(params)
    for cell in code_cells:
        compile(cell["source"], "cell", "exec")
        assert not any(line.lstrip().startswith(("!", "%")) for line in cell["source"].splitlines())
    src = "\n".join(c["source"] for c in code_cells)
    assert "--no-index" in src and "KAGGLE_INPUT_ROOT" in src and "KAGGLE_WORKING_DIR" in src
