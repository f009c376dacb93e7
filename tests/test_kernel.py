"""The offline Kaggle bundle (`kaggle-tta kernel`) and its notebook.

The proof test builds the bundle for the demo pipeline (for this interpreter: the default,
Kaggle's Python 3.12, is proved by tests/test_kaggle_py312.py), makes a fresh virtual
environment that reaches no package index and sees torch/torchvision (and the Jupyter kernel)
the way a Kaggle image has them preinstalled, lays out a fake /kaggle/input (both datasets,
wheels and bundle) and /kaggle/working, executes the notebook there, and checks its submission
against `kaggle-tta run` on the same images.

Wheels are cached in the wheel cache (default ~/.cache/kaggle-tta/wheels, or
$KAGGLE_TTA_WHEEL_CACHE): the first run on a clean machine downloads them from the package index.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
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

REPO = Path(__file__).resolve().parent.parent
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"  # --python-version for a venv of this interpreter
TEMPLATE = REPO / "kernels" / kernel.NOTEBOOK
N_DEMO = 24
# With nbclient the notebook runs in a Jupyter kernel; without, its code cells run in order in one
# process (the notebook uses no IPython magic).
NBCLIENT = all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel"))
# What a Kaggle image has preinstalled, for the test's virtual environment: torch and torchvision
# (with their dependencies), pip and the Jupyter kernel. Everything else must come from the bundle.
IMAGE_DISTS = ["torch", "torchvision", "pip"] + (["ipykernel"] if NBCLIENT else [])
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
def kernel_demo_images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kernel-demo") / "test"
    assert main(["demo-data", str(out), "--n", str(N_DEMO)]) == 0
    return out


def _image_site(dest: Path) -> Path:
    """A folder of symlinks to the system's copies of IMAGE_DISTS and their dependencies only."""
    dest.mkdir()
    pins, _ = kernel.pin_closure(
        [(d, "image") for d in IMAGE_DISTS], [], kernel.resolve_target(None)
    )  # extras and markers as pip sees them
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
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
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
        "KAGGLE_TTA_SCRATCH": str(kaggle / "scratch"),
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
    cells in order in one ``python`` process.
    """
    if NBCLIENT:
        import nbclient
        import nbformat

        spec = tmp / "jupyter" / "kernels" / "kaggle-image"
        spec.mkdir(parents=True)
        argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(
            json.dumps({"argv": argv, "display_name": "kaggle image", "language": "python", "env": env})
        )
        monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "jupyter" / "runtime"))
        nb = nbformat.read(notebook, as_version=4)
        nbclient.NotebookClient(
            nb, kernel_name="kaggle-image", timeout=900, resources={"metadata": {"path": str(working)}}
        ).execute()
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
    done = subprocess.run(
        [str(python), str(runner), str(notebook)],
        cwd=working,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


_WHERE = "import importlib.util as u, json, sys; print(json.dumps({m: getattr(u.find_spec(m), 'origin', None) for m in sys.argv[1:]}))"


def _where(python: Path, modules: list[str], cwd: Path) -> dict[str, str | None]:
    """Where ``python`` finds each module (None: nowhere)."""
    done = subprocess.run([str(python), "-c", _WHERE, *modules], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))}


# ---- the proof: the notebook runs offline from the bundle ----------------------------------------


def test_notebook_runs_offline_from_the_bundle_and_matches_kaggle_tta_run(
    kernel_demo_images, tmp_path, monkeypatch, capsys
):
    # batch_size 8: the timing pass (one batch of 8 images) is smaller than the test set (24).
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images, batch_size=8, workers=0)
    out = tmp_path / "kaggle"
    argv = [
        "kernel",
        str(pipeline),
        "--out",
        str(out),
        "--owner",
        "tester",
        "--dataset-slug",
        "tta-bundle-test",
        "--time-limit-hours",
        "2",
        "--python-version",
        HERE,
    ]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    assert "left to the Kaggle image: torch, torchvision" in stdout

    dataset, kdir, wdir = out / "dataset", out / "kernel", out / "wheels"
    man = json.loads((dataset / kernel.MANIFEST).read_text())
    wman = json.loads((wdir / kernel.WHEELS_MANIFEST).read_text())
    wheels = {w.split("-")[0].lower() for w in man["wheels"]}
    assert {"timm", "albumentations", "polars", "ensemble_boxes", "opencv_python_headless", "pydantic"} <= wheels
    assert not wheels & {"torch", "torchvision", "triton"} and not any(w.startswith(("nvidia", "cuda")) for w in wheels)
    # Split: the dependencies' wheels in a dataset named after their set; kaggle_tta's own wheel,
    # the weights and the pipeline in the small one.
    ref = f"tester/kaggle-tta-wheels-{kernel.wheel_set_id(man['wheels'])}"
    assert (
        man["wheels_dataset"] == wman["dataset"] == ref
        and man["wheel_set"] == wman["wheel_set"]
        and wman["wheels"] == man["wheels"]
    )
    assert man["python"] == wman["python"] == HERE
    assert all((wdir / w).is_file() for w in man["wheels"])
    assert [p.name for p in dataset.glob("*.whl")] == [man["package"]["wheel"]] and not list(wdir.glob("kaggle_tta-*"))
    assert sorted(p.name for p in dataset.glob("*.safetensors")) == [
        "test_efficientnet.safetensors",
        "test_resnet.safetensors",
    ]
    assert len(list((dataset / "data" / "test").glob("*.png"))) == N_DEMO  # no competition: the test images are bundled
    rewritten = yaml.safe_load((dataset / "pipeline.yaml").read_text())
    assert (
        rewritten["data"]["folder"] == "data/test"
        and rewritten["members"][0]["checkpoint"] == "test_resnet.safetensors"
    )
    meta = json.loads((kdir / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["enable_gpu"] is False and "machine_shape" not in meta
    assert meta["docker_image_pinning_type"] == "original"
    assert meta["dataset_sources"] == [ref, "tester/tta-bundle-test"] and meta["competition_sources"] == []
    assert meta["kernel_type"] == "notebook" and (kdir / meta["code_file"]).is_file()
    dmeta, wmeta = (json.loads((d / "dataset-metadata.json").read_text()) for d in (dataset, wdir))
    assert dmeta["id"] == "tester/tta-bundle-test" and wmeta["id"] == ref
    assert dmeta["licenses"] == [{"name": "copyright-authors"}] and wmeta["licenses"] == [{"name": "other"}]
    assert 20 <= len(wmeta["subtitle"]) <= 80 and 20 <= len(dmeta["subtitle"]) <= 80  # Kaggle's limits
    sizes = {d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in (dataset, wdir)}
    assert sizes["dataset"] < 10e6 < sizes["wheels"], sizes  # the part that changes per submission is the small one
    (tmp_path / "dataset-sizes.json").write_text(json.dumps(sizes))
    assert f"kaggle datasets create -p {wdir}" in stdout and f"skip it when {ref} is already on Kaggle" in stdout

    # Kaggle's side: the datasets mounted as /kaggle/input/datasets/<owner>/<slug>, an empty working folder.
    kaggle = tmp_path / "fake-kaggle"
    mount = kaggle / "input" / "datasets" / "tester" / "tta-bundle-test"
    shutil.copytree(dataset, mount, copy_function=os.link)
    shutil.copytree(wdir, kaggle / "input" / "datasets" / "tester" / ref.split("/")[1], copy_function=os.link)
    (kaggle / "input" / "some-other-dataset").mkdir()
    working = kaggle / "working"
    working.mkdir()
    before = _tree(kaggle / "input")
    python = _venv(tmp_path / "venv", _image_site(tmp_path / "image-site"))
    env = _offline_env(monkeypatch, kaggle)
    before_run = _where(python, ["kaggle_tta", *FROM_BUNDLE, "torch"], working)
    assert before_run.pop("torch") and not any(before_run.values()), before_run  # only the image's packages so far

    text = _execute(kdir / kernel.NOTEBOOK, python, working, env, tmp_path, monkeypatch)
    (tmp_path / "notebook-output.txt").write_text(text)  # kept by pytest for a look after a failure

    assert re.search(r"estimate: inference on 24 images ~ \d+:\d\d:\d\d; the notebook ~ .* of the 2 h limit", text), (
        text[-3000:]
    )
    assert "pip:" in text and "Successfully installed" in text and "timm-" in text
    assert f"wheels: {kaggle / 'input' / 'datasets' / 'tester' / ref.split('/')[1]}" in text
    assert re.search(r"wrote \S+submission\.csv: 24 rows for 24 images from 'final'", text), text[-3000:]
    after_run = _where(python, ["kaggle_tta", *FROM_BUNDLE, "torch"], working)
    assert after_run.pop("torch").startswith(str(tmp_path / "image-site"))  # torch: the image's
    assert all(str(f).startswith(str(tmp_path / "venv")) for f in after_run.values()), (
        after_run
    )  # the rest: the bundle's wheels
    assert _tree(kaggle / "input") == before  # the input stays read-only
    assert not (kaggle / "scratch").exists()  # cache removed (KEEP_CACHE False)
    # nothing else under the quota but the decisions store, for a later version (docs/kaggle.md)
    assert sorted(p.name for p in working.iterdir()) == ["kaggle-tta-decisions", "submission.csv"]
    assert re.search(r"decisions: \d+ record\(s\) saved to \S+kaggle-tta-decisions", text), text[-3000:]

    # The same pipeline and images through `kaggle-tta run` give the same submission.
    monkeypatch.undo()
    code, _, err = _run(capsys, "run", str(pipeline), "-q")
    assert code == 0, err
    ours = (working / "submission.csv").read_text()
    assert ours == (tmp_path / "reference" / "submission.csv").read_text()
    assert len(ours.splitlines()) == N_DEMO + 1

    # A new submission (other weights, same dependencies) keeps the wheels dataset: same slug,
    # nothing new to upload; only the small dataset changes.
    before_wheels = _tree(wdir)
    code, stdout, err = _run(capsys, *argv, "--set", "members.resnet.tta=flips")
    assert code == 0, err
    assert "the same wheel set as the last build here" in stdout and _tree(wdir) == before_wheels
    assert json.loads((kdir / "kernel-metadata.json").read_text())["dataset_sources"] == [ref, "tester/tta-bundle-test"]
    assert "flips" in (dataset / "pipeline.yaml").read_text()


def _bundle_without_wheels(pipeline: Path, out: Path, **opts) -> tuple[Path, Path]:
    """The dataset and kernel folders as `kaggle-tta kernel` writes them, minus the wheels (the
    wheels dataset, empty, is ``out / "wheels"``)."""
    o = kernel.KernelOptions(out=out, owner="tester", **opts)
    col = kernel.collect_files(load_pipeline(pipeline), yaml.safe_load(pipeline.read_text()), o, pipeline)
    own = out / "kaggle_tta-0.1.0-py3-none-any.whl"  # never installed: this test skips the pip cell
    own.parent.mkdir(parents=True)
    own.write_bytes(b"")
    target = kernel.resolve_target(None)
    kernel.write_wheels(out / "wheels", col.owner, {}, ["torch", "torchvision"], o, REPO, target)
    kernel.write_dataset(out / "dataset", col, own, {}, ["torch", "torchvision"], o, REPO, target)
    kernel.write_kernel(out / "kernel", col, o, REPO, kernel.wheels_ref(col.owner, o, {})[0])
    return out / "dataset", out / "kernel"


def _run_notebook_here(kdir: Path, kaggle: Path, monkeypatch) -> None:
    """The bundle's notebook run in this process (kaggle_tta is installed here: the pip cell is
    skipped) in the fake Kaggle folders under ``kaggle``."""
    for key, value in {
        "KAGGLE_INPUT_ROOT": kaggle / "input",
        "KAGGLE_WORKING_DIR": kaggle / "working",
        "KAGGLE_TTA_SCRATCH": kaggle / "scratch",
        "NO_ALBUMENTATIONS_UPDATE": 1,
        "HF_HUB_OFFLINE": 1,
    }.items():
        monkeypatch.setenv(key, str(value))
    nb = json.loads((kdir / kernel.NOTEBOOK).read_text())
    ns: dict = {"__name__": "__main__"}
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and '"pip", "install"' not in src:
            exec(compile(src, "<cell>", "exec"), ns)


def test_notebook_finds_the_competition_data_wherever_it_is_mounted(kernel_demo_images, tmp_path, monkeypatch, capsys):
    """Competition mode, in this process (kaggle_tta is installed here; the pip cell is skipped):
    the data under --data-root is read from /kaggle/input/competitions/<slug>, hidden labels are
    dropped, the competition's sample_submission.csv orders the CSV, and the submission equals
    `kaggle-tta run`'s with that sample."""
    from kaggle_tta.config import SubmissionConfig

    local = tmp_path / "comp-data"
    shutil.copytree(kernel_demo_images, local / "test")
    pipeline = _demo_pipeline(tmp_path, local / "test", batch_size=8, workers=0)
    dataset, kdir = _bundle_without_wheels(pipeline, tmp_path / "kaggle", competition="shapes-comp", data_root=local)
    assert not (dataset / "data").exists()
    kaggle = tmp_path / "fake-kaggle"
    shutil.copytree(dataset, kaggle / "input" / "tta-bundle-x")  # found by its manifest, not by its name
    shutil.copytree(
        tmp_path / "kaggle" / "wheels", kaggle / "input" / "wheels-under-another-name"
    )  # and so are the wheels
    comp = kaggle / "input" / "competitions" / "shapes-comp"
    shutil.copytree(local, comp)
    (comp / "test" / "labels.csv").unlink()  # hidden on Kaggle
    has_sample = "sample" in SubmissionConfig.model_fields
    # The competition's sample: its ids in reverse order (the file names, as Kaggle lists them).
    ids = sorted((p.stem for p in (comp / "test").glob("*.png")), reverse=True)
    (comp / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},circle\n" for i in ids))
    (kaggle / "working").mkdir()
    # an earlier version's output attached: its decisions and compiled programs are adopted, and saved again
    earlier = kaggle / "input" / "my-notebook" / "kaggle-tta-decisions"
    (earlier / "inductor" / "fxgraph").mkdir(parents=True)
    (earlier / "decisions.json").write_text(json.dumps({"from-an-earlier-run": {"ran_in": "fp32"}}))
    (earlier / "inductor" / "fxgraph" / "program").write_text("compiled")
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "the-image-store"))
    _run_notebook_here(kdir, kaggle, monkeypatch)
    out = capsys.readouterr().out
    assert f"decisions: 1 record(s) adopted from {earlier}" in out
    saved = kaggle / "working" / "kaggle-tta-decisions"
    assert "from-an-earlier-run" in json.loads((saved / "decisions.json").read_text())
    assert (saved / "inductor" / "fxgraph" / "program").read_text() == "compiled"
    assert f"competition data: {comp}" in out
    assert "data.labels.path" in out and "not used" in out
    assert "warning: no dataset named 'kaggle-tta-bundle'" in out
    assert f"wheels: {kaggle / 'input' / 'wheels-under-another-name'}" in out
    assert "estimate: inference on 24 images" in out  # the timing pass runs without the sample (its ids are others)
    assert (f"submission.sample: {comp / 'sample_submission.csv'}" in out) == has_sample

    monkeypatch.undo()
    sample = ["--set", f"submission.sample={comp / 'sample_submission.csv'}"] if has_sample else []
    code, _, err = _run(capsys, "run", str(pipeline), "-q", *sample)
    assert code == 0, err
    ours = (kaggle / "working" / "submission.csv").read_text()
    assert ours == (tmp_path / "reference" / "submission.csv").read_text()
    if has_sample:
        assert [line.split(",")[0] for line in ours.splitlines()[1:]] == ids  # the sample's order


@pytest.mark.parametrize("example", ["segmentation", "detection"])
def test_notebook_runs_the_segmentation_and_detection_examples(tmp_path, monkeypatch, capsys, example):
    """The examples bundled (data, masks or boxes, weights), the notebook's cells run in this
    process from a fake /kaggle (the pip cell skipped): its submission equals `kaggle-tta run`'s."""
    from kaggle_tta.demo.generate import write_split

    images = tmp_path / "demo" / "test"
    write_split(images, 12, seed=7, size=64)
    raw = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    raw["data"]["folder"] = str(images)
    if example == "segmentation":
        raw["data"]["masks"]["folder"] = str(images.parent / "test_masks")
    else:
        raw["data"]["boxes"]["path"] = str(images / "boxes.csv")
    for m in raw["members"]:
        m["checkpoint"] = str((REPO / "examples" / m["checkpoint"]).resolve())
    raw["cache"]["dir"] = str(tmp_path / "cache")
    raw["submission"]["path"] = str(tmp_path / "reference.csv")
    raw["runtime"]["workers"] = 0
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(raw, sort_keys=False))
    dataset, kdir = _bundle_without_wheels(pipeline, tmp_path / "kaggle")
    kaggle = tmp_path / "fake-kaggle"
    shutil.copytree(dataset, kaggle / "input" / "kaggle-tta-bundle")
    ref = json.loads((dataset / kernel.MANIFEST).read_text())["wheels_dataset"]
    shutil.copytree(tmp_path / "kaggle" / "wheels", kaggle / "input" / ref.split("/")[1])
    (kaggle / "working").mkdir()
    for key, value in {
        "KAGGLE_INPUT_ROOT": kaggle / "input",
        "KAGGLE_WORKING_DIR": kaggle / "working",
        "KAGGLE_TTA_SCRATCH": kaggle / "scratch",
        "NO_ALBUMENTATIONS_UPDATE": 1,
    }.items():
        monkeypatch.setenv(key, str(value))
    ns: dict = {"__name__": "__main__"}
    for cell in json.loads((kdir / kernel.NOTEBOOK).read_text())["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "code" and '"pip", "install"' not in src:
            exec(compile(src, "<cell>", "exec"), ns)
    out = capsys.readouterr().out
    assert re.search(r"Dice \(TTA\)" if example == "segmentation" else r"mAP@0\.5 [^|]*\(TTA\)", out), out[
        -2000:
    ]  # ground truth bundled too
    # Rows are not images: a segmentation CSV has one row per (image, class).
    written = (kaggle / "working" / "submission.csv").read_text().splitlines()
    m = re.search(r"wrote \S+: (\d+) rows for 12 images", out)
    assert m and int(m.group(1)) == len(written) - 1, out[-2000:]
    if example == "segmentation":
        assert int(m.group(1)) > 12
    monkeypatch.undo()
    code, _, err = _run(capsys, "run", str(pipeline), "-q")
    assert code == 0, err
    assert (kaggle / "working" / "submission.csv").read_text() == (tmp_path / "reference.csv").read_text()


# ---- checks before anything is written ---------------------------------------------------------


def test_missing_checkpoint_fails_before_writing(kernel_demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    raw = yaml.safe_load(pipeline.read_text())
    raw["members"][1]["checkpoint"] = str(tmp_path / "gone.safetensors")
    pipeline.write_text(yaml.safe_dump(raw))
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"))
    assert code == 2 and "members.effnet.checkpoint" in err and "gone.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_dependency_without_a_wheel_fails_naming_it(kernel_demo_images, tmp_path, monkeypatch, capsys):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
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


def test_dependency_not_installed_here_fails_naming_it(kernel_demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    code, _, err = _run(
        capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--extra-wheel", "surely-not-installed-dist"
    )
    assert code == 2 and "surely-not-installed-dist" in err and "not installed here" in err
    assert not (tmp_path / "out").exists()


def test_competition_data_must_come_from_the_competition(kernel_demo_images, tmp_path, capsys):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--competition", "some-comp")
    assert code == 2 and "data.folder" in err and "--data-root" in err
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path))
    assert code == 2 and "--competition" in err
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), "--dataset-slug", "Bad_Slug")
    assert code == 2 and "--dataset-slug" in err
    assert not (tmp_path / "out").exists()


def _collect(pipeline: Path, **opts) -> kernel.Collector:
    cfg = load_pipeline(pipeline)
    return kernel.collect_files(
        cfg, yaml.safe_load(pipeline.read_text()), kernel.KernelOptions(out=pipeline.parent / "out", **opts), pipeline
    )


def test_data_under_data_root_is_read_from_the_competition(kernel_demo_images, tmp_path):
    col = _collect(
        _demo_pipeline(tmp_path, kernel_demo_images), competition="shapes-comp", data_root=kernel_demo_images.parent
    )
    assert col.raw["data"]["folder"] == "/kaggle/input/shapes-comp/test"
    assert col.competition_paths == [
        {"key": "data.folder", "path": "test", "kind": "dir", "optional": False},
        {"key": "data.labels.path", "path": "test/labels.csv", "kind": "file", "optional": True},
    ]
    assert not col.trees and not col.tree_files  # the test data is not bundled
    assert sorted(col.files) == ["test_efficientnet.safetensors", "test_resnet.safetensors"]
    assert (  # the cache on scratch space, outside the working folder's quota; the submission in it
        col.raw["cache"]["dir"] == "/tmp/kaggle_tta/cache"
        and col.raw["submission"]["path"] == "/kaggle/working/submission.csv"
    )


def test_kaggle_paths_and_clashing_names(kernel_demo_images, tmp_path):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
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


def test_glob_csv_classes_file_and_factory_module_are_bundled(kernel_demo_images, tmp_path):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    raw = yaml.safe_load(pipeline.read_text())
    (tmp_path / "classes.txt").write_text("\n".join(raw["data"].pop("classes")) + "\n")
    raw["data"] = {"glob": f"{kernel_demo_images}/img_0000*.png", "classes_file": "classes.txt"}
    raw["members"][1] = {"name": "inv", "factory": "helpers:invariant_model", "preprocess": {"input_size": [3, 32, 32]}}
    raw["blends"] = [{"name": "ens", "inputs": ["resnet", "inv"]}]
    raw["submission"]["source"] = "ens"
    pipeline.write_text(yaml.safe_dump(raw))
    col = _collect(pipeline)
    assert col.raw["data"]["glob"] == "data/test/img_0000*.png" and col.raw["data"]["classes_file"] == "classes.txt"
    assert sorted(n for n in col.tree_files if n.startswith("data/")) == [
        f"data/test/img_0000{i}.png" for i in range(10)
    ]
    assert col.tree_files["code/helpers.py"] == Path(__file__).parent / "helpers.py" and col.code_modules == ["helpers"]

    lines = ["id,file"] + [f"x{i},sub/img_{i:05d}.png" for i in range(3)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "root" / "sub").mkdir(parents=True)
    for i in range(3):
        shutil.copy(kernel_demo_images / f"img_{i:05d}.png", tmp_path / "root" / "sub")
    raw["data"] = {"csv": {"path": "list.csv", "path_column": "file", "root": "root"}, "classes_file": "classes.txt"}
    pipeline.write_text(yaml.safe_dump(raw))
    col = _collect(pipeline)
    assert col.raw["data"]["csv"] == {"path": "data/list.csv", "path_column": "file", "root": "data/root"}
    assert sorted(col.tree_files) == [
        "code/helpers.py",
        "data/list.csv",
        *(f"data/root/sub/img_{i:05d}.png" for i in range(3)),
    ]


def _marked_schema_fields() -> set[tuple[str, str]]:
    """(section, field) of every field the schema marks with config.Bundle, found from the models."""
    import typing

    from pydantic import BaseModel

    from kaggle_tta.config import Bundle, PipelineConfig

    out, todo, seen = set(), [PipelineConfig], set()
    while todo:
        model = todo.pop()
        seen.add(model)
        for name, f in model.model_fields.items():
            if any(isinstance(m, Bundle) for m in f.metadata):
                out.add((model.__name__, name))
            stack = [f.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel) and t not in seen:
                    todo.append(t)
                stack += typing.get_args(t)
    return out


def _section_of(cfg, loc: tuple) -> str:
    node = cfg
    for part in loc[:-1]:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return type(node).__name__


def _at(raw, loc: tuple):
    for part in loc:
        raw = raw[part]
    return raw


def test_the_bundle_walks_every_path_field_the_schema_marks(kernel_demo_images, tmp_path):
    """Every field config.bundled_fields yields is bundled and rewritten, with no field named in
    kaggle_tta.kernel: these pipelines set every marked field of the schema between them (a new
    marked field fails here until a pipeline below sets it)."""
    from kaggle_tta.config import bundled_fields

    images = kernel_demo_images
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    (tmp_path / "aug.json").write_text(json.dumps({"transform": {"__class_fullname__": "Compose", "transforms": []}}))
    (tmp_path / "factory.bin").write_bytes(b"x")
    (tmp_path / "masks").mkdir()
    (tmp_path / "boxes.csv").write_text("id,x1,y1,x2,y2,label\n")
    (tmp_path / "sample_submission.csv").write_text("id,label\n")
    (tmp_path / "groups.csv").write_text("id,group\n")
    (tmp_path / "verdicts.csv").write_text("id,p\n")
    listing = "id,file\n" + "".join(f"x{i},img_{i:05d}.png\n" for i in range(3))
    (tmp_path / "list.csv").write_text(listing)
    (tmp_path / "test.json").write_text(json.dumps([{"id": f"r{i}", "band_1": [0.0, 1.0, 2.0, 3.0]} for i in range(3)]))
    beside = tmp_path / "beside"  # a CSV beside its images: an unset root defaults to its folder
    shutil.copytree(images, beside / "test")
    (beside / "test" / "list.csv").write_text(listing)
    truth = {
        "labels": {"path": str(images / "labels.csv")},
        "masks": {"folder": str(tmp_path / "masks")},
        "boxes": {"path": str(tmp_path / "boxes.csv")},
    }
    sources = {
        "csv": {"csv": {"path": str(tmp_path / "list.csv"), "path_column": "file", "root": str(images)}},
        "csv, root unset": {"csv": {"path": str(beside / "test" / "list.csv"), "path_column": "file"}},
        "folder": {"folder": str(images)},
        "glob": {"glob": f"{images}/img_0000*.png"},
        "records": {
            "records": {"path": str(tmp_path / "test.json")},
            "reader": {"columns": ["band_1"], "shape": [2, 2]},
        },
    }
    covered = set()
    for label, source in sources.items():
        raw = {
            "data": {**source, "classes_file": str(tmp_path / "classes.txt"), **truth},
            "cache": {"dir": str(tmp_path / "cache")},
            "members": [
                {
                    "name": "resnet",
                    "arch": "test_resnet",
                    "checkpoint": str(REPO / "kaggle_tta/demo/weights/test_resnet.safetensors"),
                    "preprocess": {"albumentations": str(tmp_path / "aug.json")},
                },
                {
                    "name": "inv",
                    "factory": "helpers:invariant_model",
                    "kwargs": {"num_classes": 4, "path": str(tmp_path / "factory.bin")},
                    "checkpoint": str(REPO / "kaggle_tta/demo/weights/test_efficientnet.safetensors"),
                },
            ],
            "blends": [{"name": "ens", "inputs": ["resnet", "inv"]}],
            "submission": {
                "path": str(tmp_path / "submission.csv"),
                "sample": str(tmp_path / "sample_submission.csv"),
                "group": {"column": "group", "csv": str(tmp_path / "groups.csv")},
                "pseudo_box": {"csv": str(tmp_path / "verdicts.csv"), "column": "p"},
            },
        }
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(raw, sort_keys=False))
        cfg = load_pipeline(pipeline)
        fields = list(bundled_fields(cfg))
        assert len(fields) == (14 if label == "csv" else 13), (
            label,
            [loc for loc, _, _ in fields],
        )  # csv: its path and root
        covered |= {(_section_of(cfg, loc), loc[-1]) for loc, _, _ in fields}
        # The walk: every marked field, the factory's path kwarg and module, an unset root as its CSV's folder.
        walked = kernel.list_marked(cfg)
        extra = [("members", 1, "kwargs", "path"), ("members", 1, "factory")] + (
            [("data", "csv", "root")] if label == "csv, root unset" else []
        )
        assert len(walked) == len(fields) + len(extra) and {e.loc for e in walked} == {
            loc for loc, _, _ in fields
        } | set(extra), label
        col = kernel.collect_files(
            cfg, yaml.safe_load(pipeline.read_text()), kernel.KernelOptions(out=tmp_path / "out"), pipeline
        )
        shipped = {*col.files, *(n.split("/")[0] for n in [*col.trees, *col.tree_files])}
        for loc, value, _ in fields:  # each rewritten in place: a dataset path, or the notebook's folders for outputs
            new = _at(col.raw, loc)
            written = new.startswith(("/kaggle/working/", "/tmp/kaggle_tta/"))
            assert new != str(value) and (written or new.split("/")[0] in shipped), (
                label,
                loc,
                new,
            )
        assert col.raw["members"][1]["kwargs"] == {"num_classes": 4, "path": "factory.bin"} and col.code_modules == [
            "helpers"
        ]
        if label == "csv, root unset":
            assert col.raw["data"]["csv"] == {"path": "data/list.csv", "path_column": "file", "root": "data/test"}
    assert covered == _marked_schema_fields(), "set the marked fields missing from the pipelines above"


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


# ---- kernel-metadata.json and dataset-metadata.json: what Kaggle is told -----------------------


def _metadata(tmp_path: Path, kernel_demo_images: Path, **opts) -> tuple[dict, dict, dict]:
    """(kernel-metadata, dataset-metadata, wheels dataset-metadata) as written for ``opts``."""
    tmp_path.mkdir(exist_ok=True)
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    out = tmp_path / "m"
    _bundle_without_wheels(pipeline, out, **opts)
    return tuple(
        json.loads((out / d / f).read_text())
        for d, f in (
            ("kernel", "kernel-metadata.json"),
            ("dataset", "dataset-metadata.json"),
            ("wheels", "dataset-metadata.json"),
        )
    )


def test_a_gpu_kernel_names_its_machine_and_pins_its_image(kernel_demo_images, tmp_path):
    """Without machine_shape a pushed GPU kernel lands on a P100, which the image's torch cannot
    run (kaggle-cli #490, #821, #1151): --enable-gpu writes GPU T4 x2, as Kaggle names it."""
    meta, dmeta, wmeta = _metadata(tmp_path, kernel_demo_images, enable_gpu=True)
    assert meta["enable_gpu"] is True and meta["machine_shape"] == kernel.DEFAULT_MACHINE_SHAPE == "NvidiaTeslaT4"
    assert meta["docker_image_pinning_type"] == "original" and meta["docker_image_pinning_type"] in kernel.PINNING_TYPES
    meta, _, _ = _metadata(tmp_path / "l4", kernel_demo_images, machine_shape="NvidiaL4", docker_image_pinning="latest")
    assert (
        meta["enable_gpu"] is True
        and meta["machine_shape"] == "NvidiaL4"
        and meta["docker_image_pinning_type"] == "latest"
    )
    meta, _, _ = _metadata(tmp_path / "cpu", kernel_demo_images)
    assert meta["enable_gpu"] is False and "machine_shape" not in meta
    # Licences: not CC0 by default; both selectable.
    assert dmeta["licenses"] == [{"name": kernel.DEFAULT_LICENSE}] and wmeta["licenses"] == [
        {"name": kernel.DEFAULT_WHEELS_LICENSE}
    ]
    assert "CC0-1.0" not in (kernel.DEFAULT_LICENSE, kernel.DEFAULT_WHEELS_LICENSE)
    _, dmeta, wmeta = _metadata(tmp_path / "lic", kernel_demo_images, license="CC-BY-4.0", wheels_license="unknown")
    assert dmeta["licenses"] == [{"name": "CC-BY-4.0"}] and wmeta["licenses"] == [{"name": "unknown"}]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--machine-shape", "NvidiaTeslaT5"], "did you mean 'NvidiaTeslaT4'?"),
        (["--machine-shape", "nvidial4"], "did you mean 'NvidiaL4'?"),
        (["--machine-shape", "NvidiaTeslaP100"], "sm_60"),
        (["--machine-shape", "TpuV5E8"], "a TPU"),
        (["--machine-shape", "NvidiaL4", "--no-enable-gpu"], "--no-enable-gpu"),
        (["--docker-image-pinning", "orignal"], "did you mean 'original'?"),
        (["--license", "cc0"], "did you mean 'CC0-1.0'?"),
        (["--wheels-license", "apache"], "did you mean 'apache-2.0'?"),
        (["--python-version", "3"], "like 3.12"),
        (["--wheels-slug-prefix", "X"], "--wheels-slug-prefix"),
    ],
)
def test_kaggle_metadata_options_are_checked_before_anything_is_built(
    kernel_demo_images, tmp_path, capsys, argv, message
):
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    code, _, err = _run(capsys, "kernel", str(pipeline), "--out", str(tmp_path / "out"), *argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_wheels_dataset_is_named_by_its_wheel_set_alone(kernel_demo_images, tmp_path):
    """The wheels dataset's slug is a hash of the wheel files' names: the same set, the same slug
    (nothing to upload), whatever the weights and the pipeline; another set, another slug."""
    some = {"a": Path("numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl"), "b": Path("timm-1.0.31-py3-none-any.whl")}
    o = kernel.KernelOptions(out=tmp_path)
    ref, set_id = kernel.wheels_ref("me", o, some)
    assert ref == f"me/kaggle-tta-wheels-{set_id}" and re.fullmatch(r"[0-9a-f]{10}", set_id)
    assert kernel.wheels_ref("me", o, dict(reversed(list(some.items())))) == (ref, set_id)  # order does not matter
    other = {**some, "b": Path("timm-1.0.32-py3-none-any.whl")}
    assert kernel.wheels_ref("me", o, other)[1] != set_id
    assert kernel.wheel_set_id([p.name for p in some.values()]) == set_id
    # The default target is Kaggle's Python, named in one place.
    assert kernel.KernelOptions(out=tmp_path).python_version == kernel.KAGGLE_PYTHON == "3.12"
    assert kernel.resolve_target(kernel.KAGGLE_PYTHON).python == "3.12"


def test_a_readers_wheels_are_bundled_only_where_the_pipeline_reads_its_files(kernel_demo_images, tmp_path):
    """DICOM test sets bring pydicom and the pixel-data plugins installed here; TIFFs read by
    windows bring tifffile; the demo (PNG images) brings neither."""
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    assert not {"pydicom", "tifffile"} & set(_collect(pipeline).distributions)
    raw = yaml.safe_load(pipeline.read_text())
    raw["data"]["extensions"] = [".png", ".dcm"]
    pipeline.write_text(yaml.safe_dump(raw))
    dists = _collect(pipeline).distributions
    assert dists["pydicom"] == "data.reader" and "pylibjpeg" in dists and "tifffile" not in dists


def test_checkpoints_from_kaggle_models_are_mounted_not_bundled(kernel_demo_images, tmp_path, monkeypatch, capsys):
    """Members whose checkpoints live in Kaggle Model versions: kernel-metadata.json lists them
    in model_sources and the dataset holds no copy; the notebook, in a fake /kaggle where each
    model is mounted at input/<model>/<framework>/<variation>/<version>, writes the submission
    `kaggle-tta run` writes from the local copies (runtime.kaggle_models)."""
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images, batch_size=8, workers=0)
    raw = yaml.safe_load(pipeline.read_text())
    models = tmp_path / "local-models"
    handles = []
    for m in raw["members"]:
        handle = f"tester/{m['name']}-weights/pytorch/fold0/2"
        where = models / f"{m['name']}-weights" / "pytorch" / "fold0" / "2"
        where.mkdir(parents=True)
        shutil.copy(m["checkpoint"], where / "model.safetensors")
        m.update(checkpoint="model.safetensors", kaggle_model=handle, tta="hflip")  # hflip: the test is the files
        handles.append(handle)
    raw["runtime"]["kaggle_models"] = str(models)
    pipeline.write_text(yaml.safe_dump(raw))
    dataset, kdir = _bundle_without_wheels(pipeline, tmp_path / "kaggle")
    meta = json.loads((kdir / "kernel-metadata.json").read_text())
    assert meta["model_sources"] == handles
    assert not list(dataset.rglob("*.safetensors")) and not list(dataset.rglob("*.pt*"))
    code, _, err = _run(capsys, "run", str(pipeline), "-q")  # local: from runtime.kaggle_models
    assert code == 0, err
    reference = (tmp_path / "reference" / "submission.csv").read_text()

    kaggle = tmp_path / "fake-kaggle"
    shutil.copytree(dataset, kaggle / "input" / "tta-bundle")
    shutil.copytree(tmp_path / "kaggle" / "wheels", kaggle / "input" / "wheels")
    shutil.copytree(kernel_demo_images, kaggle / "input" / "tta-bundle" / "data" / "test", dirs_exist_ok=True)
    for handle in handles:  # mounted where Kaggle mounts a notebook's models
        _, model, framework, variation, version = handle.split("/")
        shutil.copytree(models / model, kaggle / "input" / model)
    shutil.rmtree(models)  # nothing local left to fall back on
    (kaggle / "working").mkdir()
    _run_notebook_here(kdir, kaggle, monkeypatch)
    assert (kaggle / "working" / "submission.csv").read_text() == reference


def test_a_test_set_in_a_zip_is_bundled_as_its_archive(tmp_path, kernel_demo_images):
    import zipfile

    with zipfile.ZipFile(tmp_path / "test.zip", "w") as z:
        for p in sorted(kernel_demo_images.glob("*.png"))[:3]:
            z.write(p, f"test/{p.name}")
    pipeline = _demo_pipeline(tmp_path, kernel_demo_images)
    raw = yaml.safe_load(pipeline.read_text())
    raw["data"] = {"folder": str(tmp_path / "test.zip"), "classes": raw["data"]["classes"]}
    pipeline.write_text(yaml.safe_dump(raw))
    col = _collect(pipeline)
    shipped = {**col.files, **col.tree_files}
    assert col.raw["data"]["folder"] == "data/test.zip" and shipped["data/test.zip"] == tmp_path / "test.zip"


STANDIN_SERVER = '''
"""A competition's inference server, standing in for kaggle_evaluation's (tests/evaluation_standin.py)."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, {tests!r})
from evaluation_standin import Gateway

IMPORTED = time.monotonic()


class ShapesInferenceServer:
    def __init__(self, predict):
        self.predict = predict

    def serve(self):
        raise AssertionError("only the local gateway runs in this test")

    def run_local_gateway(self):
        images = sorted((Path(__file__).parent / "test").glob("*.png"))
        batches = [((str(p) for p in images[i : i + 6]), [p.stem for p in images[i : i + 6]]) for i in range(0, len(images), 6)]
        batches = [(([*paths],), ids) for (paths, ids) in batches]
        Gateway(batches, "id", Path(os.environ["KAGGLE_WORKING_DIR"]), IMPORTED).run(self.predict)
'''


def test_a_serving_notebook_answers_the_competitions_gateway(kernel_demo_images, tmp_path, monkeypatch, capsys):
    """`kaggle-tta kernel --serve module:Class`: the notebook imports the competition's server
    from its data folder, serves `predict` through it instead of running the test set, and the
    gateway's submission.parquet holds `kaggle-tta run`'s labels."""
    import polars as pl

    local = tmp_path / "comp-data"
    shutil.copytree(kernel_demo_images, local / "test")
    pipeline = _demo_pipeline(tmp_path, local / "test", batch_size=8, workers=0)
    serve = "shapes_inference_server:ShapesInferenceServer"
    dataset, kdir = _bundle_without_wheels(
        pipeline, tmp_path / "kaggle", competition="shapes-comp", data_root=local, serve=serve
    )
    kaggle = tmp_path / "fake-kaggle"
    shutil.copytree(dataset, kaggle / "input" / "kaggle-tta-bundle")
    shutil.copytree(tmp_path / "kaggle" / "wheels", kaggle / "input" / "wheels")
    comp = kaggle / "input" / "competitions" / "shapes-comp"
    shutil.copytree(local, comp)
    (comp / "shapes_inference_server.py").write_text(STANDIN_SERVER.format(tests=str(Path(__file__).parent)))
    (kaggle / "working").mkdir()
    _run_notebook_here(kdir, kaggle, monkeypatch)
    out = capsys.readouterr().out
    assert f"serving through {serve} (its local gateway)" in out
    assert not (kaggle / "working" / "submission.csv").exists()  # the batch run did not run
    served = pl.read_parquet(kaggle / "working" / "submission.parquet")
    monkeypatch.undo()
    code, _, err = _run(capsys, "run", str(pipeline), "-q")
    assert code == 0, err
    ran = pl.read_csv(tmp_path / "reference" / "submission.csv")
    assert served.columns == ["id", "label"] and served.sort("id").equals(ran.sort("id")), (served, ran)
