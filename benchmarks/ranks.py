"""Row 10: ranks. The same inference as 2 ranks x 1 thread (torchrun --standalone
--nproc_per_node 2) and as 1 rank x 2 threads (a plain `kaggle-tta infer`), on this CPU.

On one CPU the two share the same cores, so about 1x is the expected answer here: the row
measures what the ranks cost (a second process's start and model, the shard assembly), not a
speed-up. The speed-up is measured where there are two devices: benchmarks/gpu_check.sh,
1 against 2 GPUs (goal there: >= 1.8x).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _pipeline(b: Any, d: Path, threads: int) -> Path:
    from _common import member, write_pipeline  # benchmarks/ is on sys.path when run.py runs

    return write_pipeline(
        d / "pipeline.yaml",
        data={"folder": str(b.images)},
        classes_file=b.classes,
        members=[member("r18", b.ckpt, b.a.ranks_views, 224)],
        cache_dir=d / "cache",
        submission=d / "submission.csv",
        precision="fp32",
        forward_batch=b.a.forward_batch,
        batch_size=b.a.batch_size,
        workers=0,
        threads=threads,
        device=b.a.device,
    )


def _once(b: Any, ranks: int) -> dict[str, Any]:
    d = b.runs / f"ranks{ranks}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    cores = 2 if b.a.device == "cpu" else None
    p = _pipeline(b, d, (cores // ranks) if cores else None)
    if ranks == 1:
        cmd = [sys.executable, "-m", "kaggle_tta", "infer", str(p), "-q"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            "-m",
            "kaggle_tta",
            "infer",
            str(p),
            "-q",
        ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    m = re.search(r"inference: (\d+) images on .* in ([0-9.]+)s", done.stdout)
    return {
        "ranks": ranks,
        "wall_s": wall,
        "inference_s": float(m.group(2)) if m else None,
        "images": int(m.group(1)) if m else None,
        "command": " ".join(cmd[1:]),
    }


def ranks_row(b: Any, log: Any, med: Any) -> None:
    """Runs the row; ``log`` and ``med`` are the orchestrator's (benchmarks/run.py)."""
    if b.a.device == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            log(f"ranks: {torch.cuda.device_count()} CUDA device(s); the row needs 2 (skipped)")
            b.res["ranks"] = {"skipped": f"{torch.cuda.device_count()} CUDA device(s)"}
            return
    raw: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    for rep in range(b.a.repeats):
        for ranks in (1, 2):  # interleaved: load drifts hit both
            r = _once(b, ranks)
            raw[str(ranks)].append(r)
            log(
                f"ranks rep {rep + 1}/{b.a.repeats}: {ranks} rank(s): {r['wall_s']:.1f}s wall, inference {r['inference_s']}s"
            )
    b.res["ranks"] = {
        "raw": raw,
        "images": b.a.images,
        "views": b.a.ranks_views,
        "ratio_wall": med([t["wall_s"] / o["wall_s"] for o, t in zip(raw["1"], raw["2"])]),
    }


def ranks_report(res: dict[str, Any], goals: list, med: Any) -> list[str]:
    rr = res.get("ranks")
    if not rr:
        return []
    if "skipped" in rr:
        return ["## Row 10: ranks", "", f"Skipped: {rr['skipped']} (2 ranks need 2 devices).", ""]
    raw = rr["raw"]
    L = ["## Row 10: ranks on one CPU (2 ranks x 1 thread against 1 rank x 2 threads)", ""]
    L.append(
        f"{rr['images']} JPEGs, resnet18 at 224 with {rr['views']} views, fp32, a fresh cache per run; each a new process tree (wall: "
        f"starts and imports included), interleaved, medians of {len(raw['1'])}. `inference` is the run's own clock (rank 0's, with the "
        "barrier and the shard assembly)."
    )
    L.append("")
    L.append("| configuration | wall s | inference s | ratio (wall) to 1 rank |")
    L.append("|---|---|---|---|")
    for key, label in (
        ("1", "1 rank x 2 threads (`kaggle-tta infer`)"),
        ("2", "2 ranks x 1 thread (`torchrun --nproc_per_node 2`)"),
    ):
        w = med([r["wall_s"] for r in raw[key]])
        inf = med([r["inference_s"] for r in raw[key] if r["inference_s"] is not None])
        ratio = med([t["wall_s"] / o["wall_s"] for o, t in zip(raw["1"], raw[key])])
        L.append(f"| {label} | {w:.1f} | {inf:.1f} | {ratio:.2f}x |")
    L.append("")
    if res.get("machine", {}).get("cuda"):
        speedup = 1 / rr["ratio_wall"]
        L.append(
            f"On the GPU each rank has its own device: the speed-up of 2 GPUs over 1 is {speedup:.2f}x (goal >= 1.8x)."
        )
        goals.append(("2 GPUs over 1 (wall)", f"{speedup:.2f}x", "met" if speedup >= 1.8 else "missed"))
    else:
        L.append(
            "The cores are the same either way, so about 1x is expected here; two devices are measured by benchmarks/gpu_check.sh."
        )
        goals.append(
            (
                "2 ranks x 1 thread vs 1 rank x 2 threads on one CPU",
                f"{rr['ratio_wall']:.2f}x wall",
                "stated (about 1x expected)",
            )
        )
    L.append("")
    return L
