"""Row 11: adaptive views. The demo pipeline (two trained members, d4) on a demo test set of
``--adaptive-images`` images, run with full d4 and with adaptive views whose gates
``kaggle-tta tune --adaptive margin --keep-gain 0.9 --folds 5`` (the in-sample keep calibrated on
the folds to keep 0.9 held out) learned on a separate labelled split of
``--adaptive-val`` images; against the limit of full d4 (each member's forward alone on ready
tensors, 8 views x images, fp32, the faster memory layout, at the pipeline's forward batch).

Goal (#16): adaptive inference below 0.5x of the limit's seconds, at >= 90% of full d4's
accuracy gain over no TTA on the test split (the gates were learned on the other split). The
demo's d4 gain is about 1.2% of the images, so the share kept is a difference of a few rows:
4000 test images gain about 46, and the share's standard error was then about 6%; 10 000
give about 3.5%. The test split is seed 12 (4000 images of seed 11 until session 7, when the
gain kept there, 86% +- 6%, could not tell 90% from 80%).

    python3 benchmarks/run.py --out X --only adaptive --repeats 2
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FORWARD_BATCH = 64
TEST_SEED = 12
RULE, KEEP_GAIN, FOLDS = (
    "margin",
    0.9,
    5,
)  # the goal's share, calibrated on 5 folds to hold on new images (tune --calibrate-keep)


def _sets(d: Path, split: Path, threads: int) -> list[str]:
    return [
        f"data.folder={split}",
        f"data.labels.path={split / 'labels.csv'}",
        f"cache.dir={d / 'cache'}",
        f"submission.path={d / 'submission.csv'}",
        "runtime.precision=fp32",
        f"runtime.threads={threads}",
        "runtime.workers=0",
        f"runtime.forward_batch={FORWARD_BATCH}",
        "runtime.device=cpu",
    ]


def _kaggle_tta(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "kaggle_tta", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kaggle-tta {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done.stdout


def _set_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _final(stdout: str) -> tuple[float, float]:
    """(accuracy without TTA, with TTA) of the submission's node, from the report table."""
    row = next(line for line in stdout.splitlines() if "◀" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    return float(cells[3].rstrip("%")) / 100, float(cells[4].rstrip("%")) / 100


def _run(b: Any, split: Path, overrides: Path | None, threads: int) -> dict[str, Any]:
    d = b.runs / f"adaptive-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    args = ["run", str(REPO / "pipeline.yaml"), *_set_args(_sets(d, split, threads)), "-q"] + (
        ["--overrides", str(overrides)] if overrides else []
    )
    t0 = time.perf_counter()
    out = _kaggle_tta(args)
    wall = time.perf_counter() - t0
    m = re.search(r"inference: (\d+) images on .* in ([0-9.]+)s(?:, (\d+) of (\d+) forwards)?", out)
    plain, tta = _final(out)
    import polars as pl

    truth = pl.read_csv(split / "labels.csv")
    sub = pl.read_csv(d / "submission.csv").join(truth, on="id", suffix="_true")
    correct = "".join("1" if a == b else "0" for a, b in zip(sub["label"], sub["label_true"]))
    return {
        "wall_s": wall,
        "inference_s": float(m.group(2)) if m else None,
        "forwards": int(m.group(3)) if m and m.group(3) else None,
        "forwards_full": int(m.group(4)) if m and m.group(4) else None,
        "plain": plain,
        "tta": tta,
        "command": "kaggle-tta " + " ".join(args),
        "correct": correct,
    }


def _limit_child(n_inputs: int, threads: int) -> None:
    """Each demo member's forward alone: ceil(n_inputs / FORWARD_BATCH) chunks of ready
    tensors, fp32, in the faster layout; prints JSON seconds per member."""
    import timm
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    out = {}
    for arch in ("test_resnet", "test_efficientnet"):
        model = timm.create_model(arch, pretrained=False, num_classes=4)
        model.load_state_dict(load_file(str(REPO / "kaggle_tta" / "demo" / "weights" / f"{arch}.safetensors")))
        model.eval()
        x = torch.randn(FORWARD_BATCH, 3, 56, 56, generator=torch.Generator().manual_seed(0))
        chunks = -(-n_inputs // FORWARD_BATCH)
        best = None
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            model, xx = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            with torch.inference_mode():
                for _ in range(3):
                    model(xx)
                t0 = time.perf_counter()
                for _ in range(chunks):
                    model(xx)
                s = time.perf_counter() - t0
            best = s if best is None else min(best, s)
        out[arch] = best
    print(json.dumps(out))


def _limit(n_inputs: int, threads: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--limit", str(n_inputs), str(threads)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def adaptive_row(b: Any, log: Any, med: Any) -> None:
    """Runs the row; ``log`` and ``med`` are the orchestrator's (benchmarks/run.py)."""
    n, n_val, threads = b.a.adaptive_images, b.a.adaptive_val, 2
    root = b.runs / "adaptive-data"
    val, test = root / "val", root / "test"
    _kaggle_tta(["demo-data", str(val), "--n", str(n_val), "--seed", "21"])
    _kaggle_tta(["demo-data", str(test), "--n", str(n), "--seed", str(TEST_SEED)])
    # the gates: learned on the labelled val split's full-d4 cache, the gate alone
    d = b.runs / "adaptive-tune"
    d.mkdir(parents=True, exist_ok=True)
    sets = _set_args(_sets(d, val, threads))
    _kaggle_tta(["infer", str(REPO / "pipeline.yaml"), *sets, "-q"])
    gates = d / "gates.yaml"
    tune_args = [
        "tune",
        str(REPO / "pipeline.yaml"),
        *sets,
        "--adaptive",
        RULE,
        "--keep-gain",
        str(KEEP_GAIN),
        "--no-views",
        "--no-view-weights",
        "--no-temperature",
        "--member-weights",
        "off",
        "--folds",
        str(FOLDS),
        "--out",
        str(gates),
    ]
    said = [
        line.strip()
        for line in _kaggle_tta(tune_args).splitlines()
        if "adaptive: the gates keep" in line or "--calibrate-keep" in line
    ]
    log(f"adaptive: gates learned on {n_val} val images: {gates.read_text().strip()}")
    limits = [_limit(8 * n, threads)]  # timed before the runs and after them
    raw: dict[str, list[dict[str, Any]]] = {"full": [], "adaptive": []}
    for rep in range(b.a.repeats):
        for kind in ("full", "adaptive"):  # interleaved: load drifts hit both
            r = _run(b, test, gates if kind == "adaptive" else None, threads)
            raw[kind].append(r)
            log(
                f"adaptive rep {rep + 1}/{b.a.repeats}: {kind}: inference {r['inference_s']}s, accuracy {r['plain']:.4f} -> {r['tta']:.4f}, forwards {r['forwards']}"
            )
    limits.append(_limit(8 * n, threads))
    limit = min(limits, key=lambda lim: sum(lim.values()))  # the faster of the two timings: this machine's speed drifts
    # the rows where the two submissions differ: the spread of the gain kept (the full gain taken as it is)
    fc, ac = raw["full"][0]["correct"], raw["adaptive"][0]["correct"]
    diff = [int(a) - int(f) for a, f in zip(ac, fc) if a != f]
    for runs in raw.values():
        for r in runs:
            r.pop("correct")
    b.res["adaptive"] = {
        "raw": raw,
        "images": n,
        "val": n_val,
        "limit": limit,
        "gates": gates.read_text(),
        "tune": "kaggle-tta " + " ".join(tune_args),
        "differ": len(diff),
        "net": sum(diff),
        "tune_said": said,
        "limits": limits,
    }


def _both(rr: dict[str, Any]) -> str:
    lims = rr.get("limits") or []
    return ": " + " and ".join(f"{sum(lim.values()):.1f} s" for lim in lims) if len(lims) > 1 else ""


def adaptive_report(res: dict[str, Any], goals: list, med: Any) -> list[str]:
    rr = res.get("adaptive")
    if not rr:
        return []
    raw, n = rr["raw"], rr["images"]
    limit = sum(rr["limit"].values())
    full_inf = med([r["inference_s"] for r in raw["full"]])
    ad_inf = med([r["inference_s"] for r in raw["adaptive"]])
    f, a = raw["full"][0], raw["adaptive"][0]
    gain_full, gain_ad = f["tta"] - f["plain"], a["tta"] - a["plain"]
    kept = gain_ad / gain_full if gain_full > 0 else float("nan")
    # 1 SE of the gain kept: the rows whose class the two submissions give differently, each
    # +1 or -1 for the adaptive one; their sum's spread is about sqrt(their count)
    se = (rr.get("differ", 0) ** 0.5) / (gain_full * n) if gain_full > 0 else float("nan")
    extra = (a["forwards"] - 2 * n) / (a["forwards_full"] - 2 * n) if a["forwards"] else float("nan")
    L = ["## Row 11: adaptive views (the demo pipeline, d4, gates learned by `tune` on another split)", ""]
    L.append(
        f"{n} demo images (the test split, seed {TEST_SEED}); the gates were learned on {rr.get('val', 480)} others (seed 21) with `{rr['tune']}`. fp32, 2 threads, "
        f"forward batch {FORWARD_BATCH}, a fresh cache per run, interleaved, medians of {len(raw['full'])}. The limit is each member's forward "
        f"alone on ready tensors, 8 views x {n} inputs, in the faster layout ({', '.join(f'{k} {v:.1f} s' for k, v in rr['limit'].items())}; "
        f"timed before the runs and after them, the faster kept{_both(rr)})."
    )
    L.append("")
    L.append("| run | inference s | vs the limit of full d4 | forwards | accuracy no TTA -> TTA | gain |")
    L.append("|---|---|---|---|---|---|")
    L.append(f"| limit of full d4 (forward only) | {limit:.1f} | 1.00x | {16 * n} | — | — |")
    L.append(
        f"| full d4 (`kaggle-tta run`) | {full_inf:.1f} | {full_inf / limit:.2f}x | {16 * n} | {100 * f['plain']:.2f}% -> {100 * f['tta']:.2f}% | {100 * gain_full:+.2f} |"
    )
    L.append(
        f"| adaptive d4 (`--overrides gates.yaml`) | {ad_inf:.1f} | {ad_inf / limit:.2f}x | {a['forwards']} ({100 * extra:.0f}% of the extra) | "
        f"{100 * a['plain']:.2f}% -> {100 * a['tta']:.2f}% | {100 * gain_ad:+.2f} ({100 * kept:.0f}% ± {100 * se:.0f}% kept) |"
    )
    if "differ" in rr:
        L.append("")
        L.append(
            f"The two submissions give another class to {rr['differ']} of the {n} images ({rr['net']:+d} correct for the adaptive one): "
            f"the gain kept is {100 * kept:.0f}% ± {100 * se:.0f}% (1 SE)."
        )
    L.append("")
    L.append(
        "Gates: `"
        + " ".join(" ".join(line for line in rr["gates"].splitlines() if not line.lstrip().startswith("#")).split())
        + "`"
    )
    L.append("")
    for line in rr.get("tune_said", []):
        L.append(f"tune said: {line.lstrip('- ')}")
        L.append("")
    ratio = ad_inf / limit
    goals.append(
        (
            "adaptive d4 vs the limit of full d4",
            f"{ratio:.2f}x at {100 * kept:.0f}% of the gain",
            "met" if ratio < 0.5 and kept >= 0.9 else "missed",
        )
    )
    return L


if __name__ == "__main__":
    if sys.argv[1:2] == ["--limit"]:
        _limit_child(int(sys.argv[2]), int(sys.argv[3]))
