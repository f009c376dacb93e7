"""Row 13: the whole process, as a new user meets it (#27). Wall time of ``kaggle-tta run`` from
the shell (imports, planning, checks, trials, compile, streaming, blending, writing) on N
photo-sized JPEGs, resnet18 d4 at 224 px, a fresh cache and a fresh decisions store (a
machine that has decided nothing), default runtime settings; against a plain timm loop in its
own process doing the same views and mean (timm's eval transform, a DataLoader, batch 32,
the 8 D4 views of each batch through the model, the mean of their logits, argmax, a CSV).
Then a second ``kaggle-tta run`` on N other images, into another cache, with the decisions of
the first: its phase lines show what it checked or timed again (nothing, where it works).

    python3 benchmarks/run.py --out X --only process --process-images 60,512
    python3 benchmarks/process.py 60 512        # alone, printing the figures
    python3 benchmarks/process.py 5000 --first-only --dir D   # no second run (about 25 minutes a run here)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, member, write_checkpoint, write_classes, write_photo_jpegs  # noqa: E402

TRIAL_WORDS = ("checking", "timing chunk sizes", "compiling")

PLAIN = r"""
import csv, sys, time
t0 = time.perf_counter()
import torch, timm
from PIL import Image
from safetensors.torch import load_file
folder, ckpt, out = sys.argv[1:4]
model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
model.load_state_dict(load_file(ckpt), strict=True)
model.eval()
cfg = timm.data.resolve_data_config({"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
                                     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
tf = timm.data.create_transform(**cfg)
import pathlib
paths = sorted(pathlib.Path(folder).glob("*.jpg"))
class DS(torch.utils.data.Dataset):
    def __len__(self): return len(paths)
    def __getitem__(self, i): return tf(Image.open(paths[i]).convert("RGB"))
rows = []
with torch.inference_mode():
    for x in torch.utils.data.DataLoader(DS(), batch_size=32, num_workers=0):
        views = [torch.rot90(v, k, (2, 3)) for v in (x, torch.flip(x, (3,))) for k in range(4)]
        logits = torch.stack([model(v) for v in views]).mean(0)
        rows += logits.argmax(1).tolist()
with open(out, "w", newline="") as f:
    w = csv.writer(f); w.writerow(["id", "label"]); w.writerows(zip((p.stem for p in paths), (f"c{r:04d}" for r in rows)))
print(f"plain: {time.perf_counter() - t0:.1f}s in-process", file=sys.stderr)
"""


def _pipeline(path: Path, images: Path, classes: Path, ckpt: Path, cache: Path, sub: Path) -> Path:
    import yaml

    cfg = {
        "task": "classification",
        "data": {"folder": str(images), "classes_file": str(classes)},
        "cache": {"dir": str(cache)},
        "members": [member("r18", ckpt, 8)],
        "submission": {"path": str(sub), "format": "label"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}: rc {done.returncode}: {done.stderr[-2000:]}")
    return wall, done.stderr


def measure(n: int, runs: Path, second: bool = True) -> dict[str, Any]:
    """One size: the first kaggle-tta run, the plain loop, the second kaggle-tta run (not
    where ``second`` is false: at 5 000 images each run takes about 20 minutes here)."""
    work = runs / f"process-{n}"
    work.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(runs / "resnet18.safetensors")
    classes = write_classes(runs / "classes.txt")
    first_imgs = write_photo_jpegs(work / "images-a", n, seed=1)
    other_imgs = write_photo_jpegs(work / "images-b", n, seed=2) if second else first_imgs
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1")
    env["KAGGLE_TTA_TUNING_DIR"] = str(work / f"decisions-{time.time_ns()}")  # a machine that decided nothing
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{time.time_ns()}")
    res: dict[str, Any] = {"images": n}
    p1 = _pipeline(work / "a.yaml", first_imgs, classes, ckpt, work / f"cache-a-{time.time_ns()}", work / "a.csv")
    res["kaggle_tta_s"], err1 = _timed([sys.executable, "-m", "kaggle_tta", "run", str(p1)], env)
    plain = work / "plain.py"
    plain.write_text(PLAIN)
    res["plain_s"], _ = _timed([sys.executable, str(plain), str(first_imgs), str(ckpt), str(work / "plain.csv")], env)
    err2 = ""
    if second:
        p2 = _pipeline(work / "b.yaml", other_imgs, classes, ckpt, work / f"cache-b-{time.time_ns()}", work / "b.csv")
        res["second_s"], err2 = _timed([sys.executable, "-m", "kaggle_tta", "run", str(p2)], env)
    res["first_phases"] = [x for x in err1.splitlines() if x.startswith("kaggle-tta:") or x.startswith("  ")][-60:]
    res["first_time_line"] = next((x for x in err1.splitlines() if "kaggle-tta: time:" in x), "")
    res["second_time_line"] = next((x for x in err2.splitlines() if "kaggle-tta: time:" in x), "")
    res["first_decisions"] = [x for x in err1.splitlines() if any(w in x for w in TRIAL_WORDS) or "too few" in x]
    res["second_decisions"] = [x for x in err2.splitlines() if any(w in x for w in TRIAL_WORDS)]
    same = (work / "a.csv").read_text().splitlines()[1:] == (work / "plain.csv").read_text().splitlines()[1:]
    res["labels_equal_plain"] = same
    return res


def process_row(b: Any, log: Any, med: Any) -> None:
    """Runs the row for each ``--process-images`` size; ``log`` and ``med`` are the orchestrator's."""
    out = []
    for n in b.a.process_images:
        log(f"process: kaggle-tta run vs a plain timm loop, {n} images")
        out.append(measure(n, b.runs))
    b.res["process"] = out


def process_report(res: dict[str, Any], goals: list, med: Any) -> list[str]:
    rows = res.get("process")
    if not rows:
        return []
    L = ["## Row 13: the whole process (`kaggle-tta run` from the shell against a plain timm loop)", ""]
    L.append(
        "resnet18 d4 at 224 px, photo-sized JPEGs, default runtime settings, a fresh cache and decisions store; "
        "each figure one run (wall time of the process, imports included)."
    )
    L.append("")
    L.append(
        "| images | kaggle-tta run | plain timm loop | ratio | second run, new images | what the second run checked or timed |"
    )
    L.append("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["kaggle_tta_s"] / r["plain_s"]
        again = "; ".join(x.split("] ", 1)[-1] for x in r["second_decisions"]) or "nothing"
        second = f"{r['second_s']:.1f} s" if "second_s" in r else "not run"
        L.append(
            f"| {r['images']} | {r['kaggle_tta_s']:.1f} s | {r['plain_s']:.1f} s | {ratio:.2f}x | "
            f"{second} | {again if 'second_s' in r else ''} |"
        )
        goal = 1.1 if r["images"] < 512 else 1.0
        goals.append(
            (
                f"whole process at {r['images']} images ≤ {goal:.1f}x a plain timm loop",
                f"{ratio:.2f}x",
                "met" if ratio <= goal else "missed",
            )
        )
    L.append("")
    for r in rows:
        L.append(f"- {r['images']} images, first run: `{r['first_time_line'].removeprefix('kaggle-tta: ')}`")
        for x in r["first_decisions"]:
            L.append(f"  - {x.split('] ', 1)[-1].strip()}")
    L.append("")
    return L


if __name__ == "__main__":
    import tempfile

    # --first-only: no second run on new images; --dir DIR: work there (its images are reused), not in a temp folder
    args = sys.argv[1:]
    keep = args[args.index("--dir") + 1] if "--dir" in args else None
    sizes = [int(a) for a in args if a.isdigit() and a != keep] or [60]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            print(json.dumps(measure(n, Path(keep or tmp), "--first-only" not in args), indent=1), flush=True)
