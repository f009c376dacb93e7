"""GPU smoke check of the demo pipeline: bf16 (precision auto) against fp32, same pipeline.

    python3 benchmarks/gpu_smoke.py                 # device cuda (the GPU machine)
    python3 benchmarks/gpu_smoke.py --device cpu    # the same steps on the CPU (auto -> fp32 there, mostly)

Steps, each ``python3 -m kaggle_tta ...`` as a user runs it:
  1. ``demo-data build/demo/test`` (the embedded demo test set, if not there yet);
  2. ``run pipeline.yaml -q`` with ``runtime.device``, ``runtime.precision=fp32`` and its own
     cache dir and submission;
  3. the same with ``runtime.precision=auto`` (bf16 on an H200);
  4. step 3 again on the same cache: every (member, view) must be reused, no model run;
then the top-1 agreement of the two submissions (final blend) and of each member's view-merged
cached logits, and what each run printed (device, precision, forward batch, non-finite chunks,
accuracy). Exit status 1 if a run fails, the rerun computes anything, or top-1 agreement of the
submission is below 99.5%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kt(*args: str, timeout: float = 300) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "kaggle_tta", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return (
        p.returncode,
        p.stdout + (f"\n[stderr]\n{p.stderr[-4000:]}" if p.stderr.strip() else ""),
        time.perf_counter() - t0,
    )


def labels(path: Path) -> dict[str, str]:
    rows = path.read_text().splitlines()[1:]
    return dict(r.split(",", 1) for r in rows if r)


def member_top1(cache: Path) -> dict[str, object]:
    """member -> argmax of the mean over its cached views (each view file [N, C])."""
    import numpy as np

    out = {}
    for d in sorted(p for p in cache.glob("*/*") if p.is_dir()):
        views = sorted(d.glob("*.npy"))
        if not views:
            continue
        acc = None
        for v in views:
            a = np.load(v, mmap_mode="r").astype(np.float32)
            acc = a if acc is None else acc + a
        out[d.parent.name] = acc.argmax(axis=1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--pipeline", default="pipeline.yaml")
    ap.add_argument(
        "--work", default="/tmp/kaggle-tta-gpu-smoke", help="scratch: caches and submissions (emptied first)"
    )
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ok = True

    if not (REPO / "build/demo/test/labels.csv").is_file():
        rc, out, s = kt("demo-data", "build/demo/test")
        print(f"$ kaggle-tta demo-data build/demo/test  -> exit {rc} in {s:.1f}s\n{out.strip()}", flush=True)
        if rc:
            return 1

    subs = {}
    for tag, prec in (("fp32", "fp32"), ("auto", "auto"), ("auto-rerun", "auto")):
        cache = work / f"cache-{prec}"
        sub = work / f"submission-{tag}.csv"
        args = [
            "run",
            a.pipeline,
            "-q",
            "--set",
            f"runtime.device={a.device}",
            "--set",
            f"runtime.precision={prec}",
            "--set",
            f"cache.dir={cache}",
            "--set",
            f"submission.path={sub}",
        ]
        rc, out, s = kt(*args)
        print(
            f"\n$ kaggle-tta {' '.join(args)}\n  -> exit {rc} in {s:.1f}s (process wall, imports included)\n{out.strip()}",
            flush=True,
        )
        if rc:
            ok = False
            continue
        subs[tag] = sub
        if tag == "auto-rerun" and "no model was run" not in out:
            print("SMOKE: the rerun on a filled cache computed something (expected: every prediction reused)")
            ok = False
        if a.device == "cuda" and tag != "auto-rerun" and "on cuda" not in out:
            print("SMOKE: the run did not report inference on cuda")
            ok = False

    summary: dict[str, object] = {"device": a.device}
    if "fp32" in subs and "auto" in subs:
        la, lb = labels(subs["fp32"]), labels(subs["auto"])
        same = sum(la[k] == lb.get(k) for k in la)
        agree = same / len(la) if la else 0.0
        summary["submission_top1_agreement"] = agree
        summary["images"] = len(la)
        print(f"\nSMOKE: top-1 agreement of the final submission, auto vs fp32: {same}/{len(la)} = {100 * agree:.2f}%")
        if agree < 0.995:
            ok = False
        try:
            ma, mb = member_top1(work / "cache-fp32"), member_top1(work / "cache-auto")
            for m in sorted(set(ma) & set(mb)):
                ag = float((ma[m] == mb[m]).mean())
                summary[f"member_{m}_top1_agreement"] = ag
                print(f"SMOKE: member {m}: top-1 of the mean of its cached views, auto vs fp32: {100 * ag:.2f}%")
        except Exception as exc:  # the cache layout is kaggle_tta's business; this part is a bonus
            print(f"SMOKE: could not compare the cached logits per member: {exc!r}")
    print("SMOKE " + ("OK " if ok else "FAILED ") + json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
