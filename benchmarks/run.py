"""kaggle-tta benchmark (issue #5): writes OUT/bench.md (and the raw figures, OUT/bench.json).

    python3 benchmarks/run.py --out bench-results            # the full run (make bench)
    python3 benchmarks/run.py --out bench-results --quick    # smoke check: 64 images, 1 repeat
    python3 benchmarks/run.py --out bench-results --only kaggle,ttach --views 8
    python3 benchmarks/run.py --out bench-gpu --device cuda --only 1,2,3,4   # on a GPU

Every measured configuration runs in a fresh subprocess (benchmarks/_child.py); compared
configurations are interleaved (A B C A B C ...) and each figure is the median of the repeats,
ratios being medians of the per-repeat (side-by-side) ratios. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import adaptive  # noqa: E402
import process  # noqa: E402
import ranks  # noqa: E402
import readers  # noqa: E402
from _common import CHILD, PRESET, REPO, child_env, loadavg, machine_info, member, write_pipeline  # noqa: E402

ROWS = [
    "limit",
    "kaggle",
    "ttach",
    "reference",
    "reblend",
    "memory",
    "autobatch",
    "preprocess",
    "tune",
    "ranks",
    "adaptive",
    "readers",
    "process",
]
ROW_NUMBERS = {str(i + 1): r for i, r in enumerate(ROWS)}
T_START = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T_START
    print(f"[{int(el // 60):3d}:{int(el % 60):02d}] {msg}", flush=True)


# ---- running children --------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


def run_cmd(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Runs cmd; returns wall seconds, exit code, peak RSS (MB; the largest process of its tree,
    from wait4) and its stdout/stderr."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=child_env(), cwd=REPO)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:  # type: ignore[operator]
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        return {
            "wall_s": wall,
            "rc": p.returncode,
            "maxrss_mb": ru.ru_maxrss / 1024,
            "stdout": fo.read(),
            "stderr": fe.read(),
        }


CHILD_TIMEOUT: float | None = None  # --child-timeout


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    r = run_cmd([sys.executable, str(CHILD), kind, json.dumps(spec)], timeout=CHILD_TIMEOUT)
    lines = [ln for ln in r["stdout"].splitlines() if ln.startswith("RESULT ")]
    if r["rc"] != 0 or not lines:
        killed = (
            f" after the {CHILD_TIMEOUT:.0f}s --child-timeout" if CHILD_TIMEOUT and r["wall_s"] >= CHILD_TIMEOUT else ""
        )
        raise ChildFailed(f"{kind} failed (exit {r['rc']}{killed}):\n{r['stderr'][-3000:]}\n{r['stdout'][-1000:]}")
    res = json.loads(lines[-1][7:])
    if res.get("rc", 0) != 0:
        raise ChildFailed(f"{kind}: kaggle-tta exited {res['rc']}: {res.get('stdout_tail')}\n{r['stderr'][-2000:]}")
    res["wall_s"] = r["wall_s"]
    res["maxrss_mb"] = r["maxrss_mb"]
    return res


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def read_labels(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        next(f)
        for line in f:
            i, _, lab = line.rstrip("\n").partition(",")
            out[i] = lab
    return out


def agreement(a: str, b: str) -> float | None:
    try:
        la, lb = read_labels(a), read_labels(b)
    except OSError:
        return None
    if not la or set(la) != set(lb):
        return None
    return sum(la[k] == lb[k] for k in la) / len(la)


# ---- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.runs = self.work / "runs"
        self.res: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()}}
        self.failures: list[str] = []  # child failures skipped by --keep-going

    # -- setup --

    def setup(self) -> None:
        a = self.a
        self.work.mkdir(parents=True, exist_ok=True)
        log(f"setup: {a.images} JPEGs of 256x256, random-init resnet18 checkpoint, 1000 class names")
        self.images = self.work / f"img256_{a.images}"
        self.classes = self.work / "classes.txt"
        self.ckpt = self.work / "resnet18_random.safetensors"
        run_child(
            "setup",
            {
                "jpegs": [[str(self.images), a.images, 256, 0]],
                "classes": str(self.classes),
                "checkpoint": str(self.ckpt),
            },
        )
        self.subs = self.work / "submissions"
        self.subs.mkdir(exist_ok=True)

    def fresh_dir(self, tag: str) -> Path:
        d = self.runs / f"{tag}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def kt_pipeline(
        self,
        run_dir: Path,
        *,
        data: dict[str, Any],
        views: int | str,
        precision: str,
        forward_batch: int | str,
        size: int = 224,
        submission: Path | None = None,
    ) -> tuple[Path, Path]:
        sub = submission or (run_dir / "submission.csv")
        p = write_pipeline(
            run_dir / "pipeline.yaml",
            data=data,
            classes_file=self.classes,
            members=[member("r18", self.ckpt, views, size)],
            cache_dir=run_dir / "cache",
            submission=sub,
            precision=precision,
            forward_batch=forward_batch,
            batch_size=self.a.batch_size,
            workers=self.a.workers,
            threads=self.a.threads,
            device=self.a.device,
        )
        return p, sub

    def run_kaggle(
        self,
        views: int,
        precision: str,
        rep: int,
        *,
        data: dict[str, Any] | None = None,
        forward_batch: int | str | None = None,
        tag: str = "kt",
    ) -> dict[str, Any]:
        d = self.fresh_dir(f"{tag}-{precision}-v{views}")  # an empty cache for every run
        fb = self.a.forward_batch if forward_batch is None else forward_batch
        sub = self.subs / f"{tag}-{precision}-fb{fb}-v{views}-r{rep}.csv"
        pipe, sub = self.kt_pipeline(
            d,
            data=data or {"folder": str(self.images)},
            views=views,
            precision=precision,
            forward_batch=fb,
            submission=sub,
        )
        try:
            return run_child("kaggle", {"pipeline": str(pipe), "submission": str(sub), "device": self.a.device})
        finally:
            if not self.a.keep:
                shutil.rmtree(d, ignore_errors=True)

    # -- rows 1-4 --

    def inference_rows(self, rows: set[str]) -> None:
        a = self.a
        cfg_common = {
            "checkpoint": str(self.ckpt),
            "threads": a.threads,
            "forward_batch": a.forward_batch,
            "workers": a.workers,
            "device": a.device,
        }
        if a.device == "cuda":  # more forwards than on the CPU to average over, and a longer warm-up (cuDNN, clocks)
            cfg_common["warmup"] = 10
        auto_same = self.info["auto_precision"] == "fp32" and not a.measure_auto
        tools: list[tuple[str, str]] = []  # (name, precision)
        for tool in ("limit", "kaggle", "ttach"):  # each in fp32, and in auto where that differs
            if tool in rows:
                tools.append((tool, "fp32"))
                if not auto_same:
                    tools.append((tool, "auto"))
        if "reference" in rows:
            tools.append(("reference", "fp32"))
        raw: dict[str, list[dict[str, Any]]] = {}
        # Filled as the runs go, so that a failure (or the deadline) keeps what was measured.
        self.res["inference"] = {"raw": raw, "auto_same": auto_same, "tools": tools}
        total = a.repeats * len(a.views) * len(tools)
        k = 0
        for rep in range(a.repeats):
            for v in a.views:
                order = tools[rep % len(tools) :] + tools[: rep % len(tools)]  # rotate who goes first
                for name, prec in order:
                    k += 1
                    key = f"{name}/{prec}/{v}"
                    if self.past_deadline():
                        self.res["inference"]["stopped"] = (
                            f"--deadline {a.deadline:.0f}s reached: {k - 1} of {total} runs done"
                        )
                        log(f"deadline: {self.res['inference']['stopped']}; the report uses what was measured")
                        return
                    try:
                        r, msg = self.inference_run(name, prec, v, rep, cfg_common)
                    except ChildFailed as exc:
                        if not a.keep_going:
                            raise
                        self.failures.append(f"{key} rep {rep + 1}: {exc}")
                        log(
                            f"({k}/{total}) rep {rep + 1}/{a.repeats} {v:2d} view(s) {name:9s} {prec}: FAILED (--keep-going): {str(exc)[-800:]}"
                        )
                        continue
                    r["rep"] = rep
                    raw.setdefault(key, []).append(r)
                    log(
                        f"({k}/{total}) rep {rep + 1}/{a.repeats} {v:2d} view(s) {name:9s} {prec}: {msg}  [load {loadavg()}]"
                    )

    def past_deadline(self) -> bool:
        return self.a.deadline is not None and time.perf_counter() - T_START > self.a.deadline

    def inference_run(
        self, name: str, prec: str, v: int, rep: int, cfg_common: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        a = self.a
        n = a.images
        if name == "limit":
            inputs = min(v * n, a.limit_inputs)
            r = run_child("limit", {**cfg_common, "precision": prec, "inputs": inputs})
            r["seconds_scaled"] = r["per_input"] * v * n
            msg = f"{ms(r['per_input'])} ms/input x {v}x{n} = {sec(r['seconds_scaled'])}s"
        elif name == "kaggle":
            r = self.run_kaggle(v, prec, rep)
            msg = f"{sec(r['seconds'])}s in-process ({n / r['seconds']:.1f} img/s), wall {r['wall_s']:.1f}s, forward batch {r['forward_batch']}, {r['precision']}"
        elif name == "ttach":
            sub = self.subs / f"ttach-{prec}-v{v}-r{rep}.csv"
            r = run_child(
                "ttach",
                {**cfg_common, "precision": prec, "views": v, "folder": str(self.images), "submission": str(sub)},
            )
            r["submission"] = str(sub)
            msg = f"{sec(r['seconds'])}s ({n / r['seconds']:.1f} img/s)"
        else:
            sub = self.subs / f"reference-v{v}-r{rep}.csv"
            r = run_child("reference", {**cfg_common, "views": v, "folder": str(self.images), "submission": str(sub)})
            r["submission"] = str(sub)
            msg = f"{sec(r['seconds'])}s ({n / r['seconds']:.1f} img/s)"
        return r, msg

    # -- row 5 --

    def reblend_cache(self) -> tuple[Path, Path, dict[str, Any]]:
        """(folder, pipeline, setup result) of the re-blend cache: 3 members x 8 views of
        [reblend_rows, 1000] float16 logits, written once and reused (rows 5 and 9)."""
        a = self.a
        d = self.work / f"reblend_{a.reblend_rows}"
        d.mkdir(parents=True, exist_ok=True)
        img = d / "tiny.jpg"
        if not img.is_file():
            run_child("setup", {"jpegs": [[str(d / "tinyimg"), 1, 16, 1]]})
            shutil.copy(d / "tinyimg" / "00000.jpg", img)
        csv = d / "test.csv"
        if not csv.is_file():
            csv.write_text("id,path\n" + "".join(f"r{i:06d},tiny.jpg\n" for i in range(a.reblend_rows)))
        names = ["m1", "m2", "m3"]
        pipe = write_pipeline(
            d / "pipeline.yaml",
            data={"csv": {"path": str(csv), "id_column": "id", "path_column": "path"}},
            classes_file=self.classes,
            members=[member(m, self.ckpt, "d4") for m in names],
            cache_dir=d / "cache",
            submission=d / "submission.csv",
            precision="auto",
            forward_batch=a.forward_batch,
            batch_size=a.batch_size,
            workers=a.workers,
            threads=a.threads,
            cache_dtype="float16",
            blends=[{"name": "all", "inputs": names, "method": "mean", "space": "logits"}],
        )
        log(
            f"re-blend: writing 3 members x 8 views of [{a.reblend_rows}, 1000] float16 logits into the cache (reused if complete)"
        )
        setup = run_child("reblend-setup", {"pipeline": str(pipe)})
        log(
            f"re-blend: {setup['written']} view file(s) written, {setup['reused']} reused, {setup['bytes'] / 1e9:.2f} GB in {setup['seconds']:.0f}s"
        )
        return d, pipe, setup

    def reblend_row(self) -> None:
        a = self.a
        d, pipe, setup = self.reblend_cache()
        guard = run_child("blend-guard", {"pipeline": str(pipe)})
        log(
            f"re-blend: guard run (timm.create_model/build_model raise): exit {guard['rc']}, model calls {guard['model_calls']}, "
            f"nn.Modules created {guard['nn_modules_created']}, engine imported {guard['engine_imported']}, {guard['seconds']:.1f}s"
        )
        # Both sides read from the page cache: read every file once first.
        for f in setup["files"]:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        np_spec = {
            "files": setup["files"],
            "ids": setup["ids"],
            "classes": str(self.classes),
            "out": str(d / "numpy_submission.csv"),
        }
        kt_cmd = [sys.executable, "-m", "kaggle_tta", "blend", str(pipe)]  # blend shows no bar: no --quiet
        raw: dict[str, list] = {"kaggle": [], "numpy": [], "guard": [], "unverified": []}
        reps = max(a.repeats, 3)
        who_all = ["kaggle", "numpy", "guard", "unverified"]
        for rep in range(reps):
            for who in who_all[rep % len(who_all) :] + who_all[: rep % len(who_all)]:
                if who == "unverified":  # the guard run with CacheEntry.rows bypassed: no finiteness check, no CRC
                    r = run_child("blend-guard", {"pipeline": str(pipe), "verify": False})
                    if r["model_calls"] or r["nn_modules_created"]:
                        raise ChildFailed(f"kaggle-tta blend built a model: {r}")
                    msg = f"in-process {r['seconds']:.2f}s, verification bypassed ({r['crc_bytes'] / 1e9:.2f} GB through the CRC)"
                elif who == "kaggle":  # the CLI exactly as a user runs it
                    r = run_cmd(kt_cmd)
                    if r["rc"] != 0:
                        raise ChildFailed(f"kaggle-tta blend failed: {r['stderr'][-2000:]}")
                    r = {"wall_s": r["wall_s"], "maxrss_mb": r["maxrss_mb"]}
                    msg = f"wall {r['wall_s']:.2f}s"
                elif who == "guard":  # the same, in-process after the imports, nothing may build a model
                    r = run_child("blend-guard", {"pipeline": str(pipe)})
                    if r["model_calls"] or r["nn_modules_created"]:
                        raise ChildFailed(f"kaggle-tta blend built a model: {r}")
                    msg = f"in-process {r['seconds']:.2f}s, verified ({r['crc_bytes'] / 1e9:.2f} GB through the CRC)"
                else:
                    r = run_child("numpy-blend", np_spec)
                    msg = f"wall {r['wall_s']:.2f}s, in-process {r['seconds']:.2f}s"
                raw[who].append(r)
                log(f"re-blend rep {rep + 1}/{reps} {who:7s}: {msg}, peak RSS {r['maxrss_mb']:.0f} MB")
        agree = agreement(str(d / "submission.csv"), str(d / "numpy_submission.csv"))
        self.res["reblend"] = {
            "setup": {k: v for k, v in setup.items() if k != "files"},
            "guard": guard,
            "raw": raw,
            "agreement": agree,
        }

    # -- row 9 --

    def tune_row(self) -> None:
        """``kaggle-tta tune`` on the re-blend cache (labels made from the cached logits: the
        top class of one member's mean for 70% of rows, a random class for the rest), in
        sample (--folds 0) and with the default 5-fold estimate, against one re-blend of the
        same labelled pipeline; each a fresh CLI process, interleaved."""
        a = self.a
        d, pipe, setup = self.reblend_cache()
        labels = d / "labels.csv"
        if not labels.is_file():
            run_child("tune-labels", {"pipeline": str(pipe), "out": str(labels), "classes": str(self.classes)})
        over = d / "labels.yaml"
        over.write_text(f"data:\n  labels: {{path: {labels}}}\n")
        base = [sys.executable, "-m", "kaggle_tta"]
        cmds = {
            "blend": base + ["blend", str(pipe), "--overrides", str(over)],
            "tune-in-sample": base
            + ["tune", str(pipe), "--overrides", str(over), "--out", str(d / "tuned0.yaml"), "--folds", "0"],
            "tune": base + ["tune", str(pipe), "--overrides", str(over), "--out", str(d / "tuned.yaml")],
        }
        guard = run_child(
            "tune-guard", {"pipeline": str(pipe), "overrides": str(over), "out": str(d / "tuned_guard.yaml")}
        )
        log(
            f"tune: guard run (build_model and decode_image raise): exit {guard['rc']}, torch imported {guard['torch_imported']}, {guard['seconds']:.1f}s"
        )
        raw: dict[str, list] = {k: [] for k in cmds}
        reps = a.repeats
        order = list(cmds)
        for rep in range(reps):
            for who in order[rep % len(order) :] + order[: rep % len(order)]:
                r = run_cmd(cmds[who])
                if r["rc"] != 0:
                    raise ChildFailed(f"{' '.join(cmds[who])} failed: {r['stderr'][-2000:]}")
                raw[who].append(
                    {"wall_s": r["wall_s"], "maxrss_mb": r["maxrss_mb"], "stdout_tail": r["stdout"][-3000:]}
                )
                log(f"tune rep {rep + 1}/{reps} {who:15s}: wall {r['wall_s']:.1f}s, peak RSS {r['maxrss_mb']:.0f} MB")
        self.res["tune"] = {
            "setup": {k: v for k, v in setup.items() if k != "files"},
            "guard": guard,
            "raw": raw,
            "commands": {k: " ".join(v[3:]) for k, v in cmds.items()},
        }

    # -- row 6 --

    def memory_row(self) -> None:
        a = self.a
        small, large = a.memory_images
        folders = {}
        log(f"memory: writing {small} and {large} JPEGs of 64x64 (reused if present)")
        for n in (small, large):
            folders[n] = self.work / f"img64_{n}"
        run_child("setup", {"jpegs": [[str(folders[n]), n, 64, 2] for n in (small, large)]})
        raw: dict[int, list] = {small: [], large: []}
        for rep in range(a.repeats):
            for n in (small, large) if rep % 2 == 0 else (large, small):
                d = self.fresh_dir(f"mem-{n}")
                pipe, _ = self.kt_pipeline(
                    d,
                    data={"folder": str(folders[n])},
                    views=a.memory_tta,
                    precision="auto",
                    forward_batch=a.forward_batch,
                    size=56,
                )
                r = run_cmd([sys.executable, "-m", "kaggle_tta", "run", str(pipe), "-q"])
                if not a.keep:
                    shutil.rmtree(d, ignore_errors=True)
                if r["rc"] != 0:
                    raise ChildFailed(f"kaggle-tta run failed: {r['stderr'][-2000:]}")
                raw[n].append({"wall_s": r["wall_s"], "maxrss_mb": r["maxrss_mb"]})
                log(
                    f"memory rep {rep + 1}/{a.repeats} {n:5d} images: peak RSS {r['maxrss_mb']:.0f} MB, wall {r['wall_s']:.1f}s"
                )
        self.res["memory"] = {"raw": {str(k): v for k, v in raw.items()}, "sizes": [small, large]}

    # -- row 7 --

    def autobatch_row(self) -> None:
        a = self.a
        n = min(a.autobatch_images, a.images)
        paths = sorted(self.images.glob("*.jpg"))[:n]
        csv = self.work / f"autobatch_{n}.csv"
        csv.write_text("id,path\n" + "".join(f"{p.stem},{p}\n" for p in paths))
        data = {"csv": {"path": str(csv), "id_column": "id", "path_column": "path"}}
        configs: list[int | str] = ["auto", 8, 16, 32, 64, 128]
        raw: dict[str, list] = {str(c): [] for c in configs}
        reps = a.autobatch_repeats
        for rep in range(reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for c in order:
                r = self.run_kaggle(a.autobatch_views, "fp32", rep, data=data, forward_batch=c, tag="autobatch")
                raw[str(c)].append(r)
                log(
                    f"forward_batch rep {rep + 1}/{reps} {str(c):>4s}: {r['seconds']:.1f}s ({n / r['seconds']:.1f} img/s), ran at forward batch {r['forward_batch']}"
                )
        self.res["autobatch"] = {"raw": raw, "images": n, "views": a.autobatch_views}

    # -- row 8 --

    PREPROCESS_CONFIGS = (  # (key, backend, positions); backend None: decode alone
        ("decode", None, ()),
        ("timm/center", "timm", ("center",)),
        ("albumentations/center", "albumentations", ("center",)),
        ("timm/five_crop", "timm", ("center", "tl", "tr", "bl", "br")),
        ("albumentations/five_crop", "albumentations", ("center", "tl", "tr", "bl", "br")),
    )

    def preprocess_row(self) -> None:
        a = self.a
        n = a.preprocess_images
        folder = self.work / f"photos_{n}"
        log(
            f"preprocess: {n} camera-sized JPEGs ({' and '.join(f'{w}x{h}' for w, h in _common.PHOTO_SIZES)}, reused if present)"
        )
        run_child("setup", {"photos": [[str(folder), n, 3]]})
        files = sorted(folder.glob("*.jpg"))
        for f in files:  # every run reads them from the page cache
            f.read_bytes()
        base = {"folder": str(folder), "size": [224, 224], "crop_pct": 0.875, "interpolation": "bilinear", "warmup": 2}
        raw: dict[str, list] = {k: [] for k, _, _ in self.PREPROCESS_CONFIGS}
        reps = a.preprocess_repeats
        cfgs = self.PREPROCESS_CONFIGS
        for rep in range(reps):
            for key, backend, positions in cfgs[rep % len(cfgs) :] + cfgs[: rep % len(cfgs)]:
                r = run_child("preprocess", {**base, "backend": backend, "positions": list(positions)})
                r["rep"] = rep
                raw[key].append(r)
                extra = (
                    f" (preprocessing {ms(r['preprocess_per_image_s'])} ms), crops {r['shapes'][0]}" if backend else ""
                )
                log(
                    f"preprocess rep {rep + 1}/{reps} {key:25s}: {ms(r['per_image_s'])} ms/image{extra}  [load {loadavg()}]"
                )
        self.res["preprocess"] = {
            "raw": raw,
            "images": n,
            "sizes": [list(x) for x in _common.PHOTO_SIZES],
            "mean_kb": sum(f.stat().st_size for f in files) / len(files) / 1e3,
            **{k: v for k, v in base.items() if k != "folder"},
        }


# ---- the report --------------------------------------------------------------------------------


def ok(flag: bool | None) -> str:
    return "—" if flag is None else ("✅ met" if flag else "❌ missed")


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def sec(x: float | None) -> str:
    """Seconds: one decimal, three below 1 s (GPU runs)."""
    return "—" if x is None else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def ms(x: float) -> str:
    """Seconds as milliseconds: one decimal, three below 1 ms (GPU forwards)."""
    return f"{x * 1000:.1f}" if x >= 1e-3 else f"{x * 1000:.3f}"


def device_words(info: dict[str, Any]) -> str:
    if info.get("device") != "cuda":
        return "cpu"
    return f"cuda ({info.get('gpu', '?')})"


def report(b: Bench) -> str:
    a, info, res = b.a, b.info, b.res
    L: list[str] = []
    goals: list[tuple[str, str, str]] = []  # (goal, figure, status)
    cuda = a.device == "cuda"
    L.append("# kaggle-tta benchmark" + (f" — GPU: {info.get('gpu', '?')}" if cuda else ""))
    L.append("")
    if cuda:
        L.append(
            f"- **Device**: {info.get('gpu', '?')} ({info.get('gpu_memory_gb', '?')} GB, compute capability {info.get('gpu_capability', '?')}, "
            f"{info.get('gpu_count', '?')} visible), driver {info.get('gpu_driver', '?')}, CUDA {info.get('cuda_runtime', '?')}, cuDNN {info.get('cudnn', '?')}, "
            f"bf16: {'yes' if info.get('cuda_bf16') else 'no'}; TF32 (torch defaults, untouched): cuDNN convolutions "
            f"{'on' if info.get('cudnn_allow_tf32') else 'off'}, matmul {'on' if info.get('matmul_allow_tf32') else 'off'}"
        )
    L.append(
        f"- **Machine**: {info['cpu']}, {info['cores']} cores ({', '.join(info['simd']) or 'no AVX2'}; native bf16: {'yes' if info['native_bf16'] else 'no'}), "
        f"{info['memory_gb']} GB RAM, CUDA: {'yes' if info['cuda'] else 'no'}; {info['os']}"
    )
    L.append(
        f"- **Software**: Python {info['python']}, torch {info['torch']}, timm {info['timm']}, albumentations {info['albumentations']}, "
        f"ttach {info['ttach']}, numpy {info['numpy']}, OpenCV {info['opencv']}"
    )
    L.append(
        f"- **Date**: {info['date']}; run took {res['elapsed_min']:.1f} min; load average at start {res['load_start']}, at end {res['load_end']}"
    )
    threads = (
        f"{a.threads} threads" if a.threads else f"torch's default threads ({info.get('torch_default_threads', '?')})"
    )
    L.append(
        f"- **Setup**: timm `resnet18` (random init, `pretrained=False`), 224x224 inputs from 256-px JPEGs, {a.images} images, "
        f"{threads}, `forward_batch: {a.forward_batch}`, `batch_size: {a.batch_size}`, `workers: {a.workers}`, device {device_words(info)}; "
        f"`precision: auto` resolves to **{info['auto_precision']}** here. Medians of {a.repeats} interleaved repeat(s)"
        + (" (`--quick`)" if a.quick else "")
        + "."
    )
    if cuda:
        L.append(
            "- **On the GPU**: models and batches on the GPU; decoding and preprocessing on the CPU (kaggle-tta's and ttach's DataLoader "
            "workers, the reference path in its main process) except kaggle-tta's normalization and views, which run on the GPU. "
            "channels_last throughout (the engine's `channels_last: auto` on CUDA), autocast only where the precision is bf16/fp16; "
            "the reference path is fp32 as in the document. Every child creates its CUDA context before its clock starts "
            "(like its imports) and synchronizes before reading a clock."
        )
    if not cuda and info["auto_precision"] == "fp32":
        L.append(
            "- **Memory layout**: `channels_last: auto` on a CPU in fp32 times both layouts on the first chunks and keeps the faster "
            "(the layout each run picked is named in its row). The limit is the faster of the two, measured for each; ttach gets "
            "the faster, picked on ready tensors before its clock starts; the reference path stays contiguous, as in the document."
        )
    L.append("")

    inf = res.get("inference")
    if inf:
        raw = inf["raw"]
        auto_same = inf["auto_same"]
        n = a.images

        def secs(key: str) -> list[float]:
            field = "seconds_scaled" if key.startswith("limit") else "seconds"
            return [r[field] for r in raw.get(key, [])]

        def paired(num: str, den: str) -> float | None:
            """Median over repeats of seconds(num)/seconds(den), pairs from the same repeat."""
            A = {r["rep"]: r for r in raw.get(num, [])}
            B = {r["rep"]: r for r in raw.get(den, [])}
            fa = "seconds_scaled" if num.startswith("limit") else "seconds"
            fb = "seconds_scaled" if den.startswith("limit") else "seconds"
            return med([A[k][fa] / B[k][fb] for k in A if k in B])

        def alias(key: str) -> str:  # auto measured by the fp32 run where auto resolves to fp32
            return key.replace("/auto/", "/fp32/") if auto_same else key

        def layout(key: str) -> str:
            """The memory layout the runs of ``key`` used: ', channels_last' or ', contiguous'
            (a mix counted): where channels_last: auto timed both, what was picked."""
            got = [r.get("channels_last") for r in raw.get(key, []) if r.get("channels_last") is not None]
            if not got:
                return ""
            names = ["channels_last" if g else "contiguous" for g in got]
            if len(set(names)) == 1:
                return f", {names[0]}"
            return ", " + " / ".join(f"{names.count(x)}× {x}" for x in sorted(set(names)))

        L.append("## Rows 1–4: inference, end to end")
        L.append("")
        L.append(
            "Seconds are in-process (after the Python imports, which every tool pays alike; kaggle-tta's whole-process wall time, "
            "imports included, is in its own column). Ratios are medians of per-repeat ratios."
        )
        L.append("")
        if inf.get("stopped"):
            L.append(f"**Stopped early**: {inf['stopped']}; figures below use the runs that were done.")
            L.append("")
        L.append("| # | path | views | precision | seconds | images/s | ratio | goal | status |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for v in a.views:
            for prec in ("fp32", "auto"):
                lim = f"limit/{prec}/{v}"
                if not raw.get(lim) or (prec == "auto" and auto_same):
                    continue
                per = med([r["per_input"] for r in raw[lim]])
                label = f"auto (→{info['auto_precision']})" if prec == "auto" else "fp32"
                comp = [r for r in raw[lim] if r.get("per_input_compiled") is not None]
                how = (
                    f" (the best of eager {ms(med([r['per_input_eager'] for r in comp]))} and torch.compile "
                    f"{ms(med([r['per_input_compiled'] for r in comp]))} ms/input, compiled in "
                    f"{med([r['compile_s'] for r in comp]):.0f} s)"
                    if comp
                    else ""
                )
                L.append(
                    f"| 1 | limit: forward only{layout(lim)}, {ms(per)} ms/input{how} × {v}×{n} | {v} | {label} | "
                    f"{sec(med(secs(lim)))} | {fmt(n / med(secs(lim)), '.1f')} | 1.00 | — | |"
                )
            for prec in ("fp32", "auto"):
                key = alias(f"kaggle/{prec}/{v}")
                if not raw.get(key):
                    continue
                s = med(secs(key))
                ratio = paired(key, alias(f"limit/{prec}/{v}"))
                wall = med([r["wall_s"] for r in raw[key]])
                goal_applies = v in (2, 8, 10) and ratio is not None
                st = ok(ratio <= 1.10) if goal_applies else ""
                label = (
                    f"auto (→{info['auto_precision']}{', same runs as fp32' if auto_same else ''})"
                    if prec == "auto"
                    else "fp32"
                )
                L.append(
                    f"| 2 | kaggle-tta run{layout(key)} (process wall {wall:.1f}s) | {v} | {label} | {sec(s)} | {n / s:.1f} | {fmt(ratio)}× limit | "
                    f"{'≤ 1.10' if v in (2, 8, 10) else '—'} | {st} |"
                )
                if goal_applies:
                    goals.append((f"kaggle-tta ≤ 1.10 × limit, {v} views, {prec}", f"{ratio:.2f}×", st))
            for prec in ("fp32", "auto"):
                tkey = f"ttach/{prec}/{v}"
                if not raw.get(tkey) or (prec == "auto" and auto_same):
                    continue
                s = med(secs(tkey))
                sp = paired(tkey, f"kaggle/{prec}/{v}")  # ttach seconds / kaggle seconds = kaggle speed / ttach speed
                st = ok(sp >= 1.0) if sp is not None else ""
                label = f"auto (→{info['auto_precision']})" if prec == "auto" else "fp32"
                L.append(
                    f"| 3 | ttach ClassificationTTAWrapper{layout(tkey)} | {v} | {label} | {sec(s)} | {n / s:.1f} | kaggle-tta {fmt(sp)}× as fast | ≥ 1.00 | {st} |"
                )
                if sp is not None:
                    goals.append(
                        (
                            f"kaggle-tta at least as fast as ttach, {v} views" + (", auto" if prec == "auto" else ""),
                            f"{sp:.2f}×",
                            st,
                        )
                    )
            rkey = f"reference/fp32/{v}"
            if raw.get(rkey):
                s = med(secs(rkey))
                sp = paired(rkey, alias(f"kaggle/auto/{v}"))
                goal_applies = v in (8, 10) and sp is not None
                st = ok(sp >= 3.0) if goal_applies else ""
                L.append(
                    f"| 4 | reference document, per image | {v} | fp32 | {sec(s)} | {n / s:.1f} | kaggle-tta (auto) {fmt(sp)}× as fast | "
                    f"{'≥ 3' if v in (8, 10) else '—'} | {st} |"
                )
                if goal_applies:
                    goals.append((f"kaggle-tta auto ≥ 3 × reference images/s, {v} views", f"{sp:.2f}×", st))
        L.append("")
        # top-1 agreement (repeat 0)
        agree_rows = []
        for v in a.views:
            base = next((r for r in raw.get(f"kaggle/fp32/{v}", []) if r["rep"] == 0), None)
            if not base:
                continue
            auto_r = next((r for r in raw.get(f"kaggle/auto/{v}", []) if r["rep"] == 0), None)
            ag_auto = 1.0 if auto_same else (agreement(auto_r["submission"], base["submission"]) if auto_r else None)
            others = {}
            for t in ("ttach/fp32", "reference/fp32"):
                o = next((r for r in raw.get(f"{t}/{v}", []) if r["rep"] == 0), None)
                others[t] = agreement(o["submission"], base["submission"]) if o else None
            n_classes = len(set(read_labels(base["submission"]).values()))
            agree_rows.append((v, ag_auto, others["ttach/fp32"], others["reference/fp32"], n_classes))
            if v in (8, 10) and ag_auto is not None:
                st = ok(ag_auto >= 0.995)
                goals.append(
                    (
                        f"top-1 of auto agrees with fp32 on ≥ 99.5%, {v} views",
                        f"{100 * ag_auto:.1f}%" + (" (same runs)" if auto_same else ""),
                        st,
                    )
                )
        if agree_rows:
            L.append("Top-1 agreement with the kaggle-tta fp32 run (repeat 1):")
            L.append("")
            L.append("| views | kaggle-tta auto | ttach | reference | distinct top-1 classes (fp32) |")
            L.append("|---|---|---|---|---|")
            for v, x, y, z, nc in agree_rows:
                L.append(
                    f"| {v} | {fmt(x and 100 * x, '.1f', '%')}{' (same runs)' if auto_same else ''} | {fmt(y and 100 * y, '.1f', '%')} | "
                    f"{fmt(z and 100 * z, '.1f', '%')} | {nc} |"
                )
            L.append("")

    rb = res.get("reblend")
    if rb:
        raw = rb["raw"]
        kt = med([r["wall_s"] for r in raw["kaggle"]])
        nb = med([r["wall_s"] for r in raw["numpy"]])
        kt_in = med([r["seconds"] for r in raw["guard"]])
        nb_in = med([r["seconds"] for r in raw["numpy"]])
        ratio = med([k["wall_s"] / n_["wall_s"] for k, n_ in zip(raw["kaggle"], raw["numpy"])])
        ratio_in = med([k["seconds"] / n_["seconds"] for k, n_ in zip(raw["guard"], raw["numpy"])])
        unv = raw.get("unverified", [])
        unv_in = med([r["seconds"] for r in unv])
        # verification's share of the blend, per repeat: (verified - bypassed) / verified, in-process
        share = med([(gv["seconds"] - u["seconds"]) / gv["seconds"] for gv, u in zip(raw["guard"], unv)])
        ver_s = med([gv["seconds"] - u["seconds"] for gv, u in zip(raw["guard"], unv)])
        ratio_in_unv = med([u["seconds"] / n_["seconds"] for u, n_ in zip(unv, raw["numpy"])])
        # the wall ratio less what verification cost in that repeat (an estimate: the wall runs are not bypassed)
        ratio_wall_unv = med(
            [
                (k["wall_s"] - (gv["seconds"] - u["seconds"])) / n_["wall_s"]
                for k, gv, u, n_ in zip(raw["kaggle"], raw["guard"], unv, raw["numpy"])
            ]
        )
        crc_ok = (
            all(r.get("crc_bytes") == rb["setup"]["bytes_data"] for r in raw["guard"])
            if "bytes_data" in rb["setup"]
            else None
        )
        g = rb["guard"]
        no_model = g["rc"] == 0 and all(
            r["model_calls"] == 0 and r["nn_modules_created"] == 0 for r in [g, *raw["guard"], *unv]
        )
        st = ok(ratio <= 1.5)
        s = rb["setup"]
        L.append("## Row 5: re-blend from the cache")
        L.append("")
        L.append(
            f"3 members × 8 views (d4) of [{s['rows']}, {s['classes']}] float16 logits ({s['bytes'] / 1e9:.2f} GB, read from the page cache), "
            "blended `mean` in logit space. Baseline: a Python process that `np.load`s the 24 files, averages them in a float32 accumulator, "
            "takes the argmax and writes `id,label` to a CSV. *Wall*: whole process, interpreter start and imports included (what a user waits for); "
            "*in-process*: after the imports. The goal is judged on the wall time."
        )
        L.append("")
        L.append(
            "| path | wall s | in-process s | rows/s (wall) | peak RSS MB | ratio wall | ratio in-process | goal | status |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        L.append(
            f"| numpy read + average + argmax + CSV | {nb:.2f} | {nb_in:.2f} | {s['rows'] / nb:,.0f} | {med([r['maxrss_mb'] for r in raw['numpy']]):.0f} | 1.00 | 1.00 | | |"
        )
        L.append(
            f"| `kaggle-tta blend` | {kt:.2f} | {kt_in:.2f} | {s['rows'] / kt:,.0f} | {med([r['maxrss_mb'] for r in raw['kaggle']]):.0f} | "
            f"{ratio:.2f}× | {ratio_in:.2f}× | ≤ 1.5 | {st} |"
        )
        if unv:
            L.append(
                f"| `kaggle-tta blend`, verification bypassed (in-process only) | — | {unv_in:.2f} | — | — | "
                f"≈ {fmt(ratio_wall_unv)}× (est.) | {fmt(ratio_in_unv)}× | | |"
            )
        L.append("")
        if unv:
            gb = med([r["crc_bytes"] for r in raw["guard"]]) / 1e9
            L.append(
                f"**Verification** (every block: non-finite check; each view's CRC-32 at its last row, `CacheEntry.rows`): {fmt(ver_s)} s of the "
                f"{kt_in:.2f} s in-process blend, **{fmt(share and 100 * share, '.0f', '%')}** (median of per-repeat (verified − bypassed) / verified; "
                f"{gb:.2f} GB through the CRC per verified run{'' if crc_ok is None else (', every byte of the 24 views' if crc_ok else ', NOT every byte of the views')}, "
                f"{med([r['crc_bytes'] for r in unv]) / 1e9:.2f} GB when bypassed). Bypassed = the same in-process blend with `kaggle_tta.cache.entry.CacheEntry.rows` "
                f"monkeypatched to `self.read(view)[lo:hi]`; the wall ratio without it (≈ {fmt(ratio_wall_unv)}×) is the measured wall less that repeat's difference."
            )
            L.append("")
        L.append(
            f"No model built: `kaggle-tta blend` run {1 + len(raw['guard'])} times with `timm.create_model` and `kaggle_tta.io.models.build_model` patched to raise "
            f"and `torch.nn.Module.__init__` counted: exit {g['rc']}, {g['nn_modules_created']} modules created, the engine module "
            f"{'imported' if g['engine_imported'] else 'not imported'} → {ok(no_model)}. Labels agree with the numpy baseline on "
            f"{fmt(rb['agreement'] and 100 * rb['agreement'], '.2f', '%')} of rows."
        )
        L.append("")
        goals.append(
            (
                "re-blend ≤ 1.5 × numpy read-and-average (wall)",
                f"{ratio:.2f}× ({kt:.2f}s vs {nb:.2f}s); in-process {ratio_in:.2f}×"
                + (f"; verification {fmt(share and 100 * share, '.0f', '%')} of the blend" if unv else ""),
                st,
            )
        )
        goals.append(("re-blend builds no model", "0 modules" if no_model else "a model was built", ok(no_model)))

    mem = res.get("memory")
    if mem:
        small, large = mem["sizes"]
        rs = med([r["maxrss_mb"] for r in mem["raw"][str(small)]])
        rl = med([r["maxrss_mb"] for r in mem["raw"][str(large)]])
        ratio = rl / rs
        st = ok(ratio <= 1.10)
        L.append("## Row 6: peak memory")
        L.append("")
        L.append(
            f"`python3 -m kaggle_tta run PIPELINE -q` on 64x64 JPEGs (resnet18 at 56x56, tta `{a.memory_tta}`, 1000 classes, float32 cache, "
            f"`batch_size: {a.batch_size}`, `workers: {a.workers}`); peak RSS of the largest process of the run (wait4), median of {a.repeats}."
        )
        L.append("")
        L.append("| images | peak RSS MB | wall s | ratio | goal | status |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| {small} | {rs:.0f} | {med([r['wall_s'] for r in mem['raw'][str(small)]]):.1f} | 1.00 | | |")
        L.append(
            f"| {large} | {rl:.0f} | {med([r['wall_s'] for r in mem['raw'][str(large)]]):.1f} | {ratio:.2f}× | ≤ 1.10 | {st} |"
        )
        L.append("")
        goals.append((f"peak RSS at {large} images ≤ 1.10 × at {small}", f"{ratio:.2f}× ({rl:.0f} vs {rs:.0f} MB)", st))

    ab = res.get("autobatch")
    if ab:
        raw = ab["raw"]
        n = ab["images"]
        fixed = {int(c): med([r["seconds"] for r in rs]) for c, rs in raw.items() if c != "auto" and rs}
        best_c = min(fixed, key=lambda c: fixed[c])
        chosen = [r["forward_batch"] for r in raw["auto"]]
        pick = statistics.mode(chosen) if chosen else None
        auto_s = med([r["seconds"] for r in raw["auto"]])
        L.append("## Row 7: `forward_batch: auto`")
        L.append("")
        L.append(
            f"kaggle-tta end to end, {n} images × {ab['views']} views ({PRESET.get(ab['views'], ab['views'])}), fp32, `batch_size: {a.batch_size}`; "
            f"medians of {a.autobatch_repeats} interleaved repeat(s). Auto picked: {', '.join(map(str, chosen))}."
        )
        L.append("")
        L.append("| forward_batch | seconds | images/s | vs best fixed |")
        L.append("|---|---|---|---|")
        for c in sorted(fixed):
            L.append(
                f"| {c}{' (best)' if c == best_c else ''}{' ← auto' if c == pick else ''} | {fixed[c]:.1f} | {n / fixed[c]:.1f} | {fixed[best_c] / fixed[c]:.3f} |"
            )
        L.append(f"| auto (trials included) | {auto_s:.1f} | {n / auto_s:.1f} | {fixed[best_c] / auto_s:.3f} |")
        L.append("")
        if pick in fixed:
            rel = fixed[best_c] / fixed[pick]
            st = ok(rel >= 0.95)
            goals.append(
                (
                    "`forward_batch: auto` picks a size within 5% of the best fixed",
                    f"picked {pick}: {rel:.3f} of best ({best_c}); auto run {fixed[best_c] / auto_s:.3f}",
                    st,
                )
            )
        else:
            goals.append(
                (
                    "`forward_batch: auto` picks a size within 5% of the best fixed",
                    f"picked {pick} (not among the fixed sizes)",
                    "—",
                )
            )

    pp = res.get("preprocess")
    if pp:
        raw = pp["raw"]
        dec = {r["rep"]: r for r in raw["decode"]}
        L.append("## Row 8: preprocessing backends (decode + crops, per image)")
        L.append("")
        L.append(
            f"{pp['images']} JPEGs written by the benchmark, alternating {' and '.join(f'{w}×{h}' for w, h in pp['sizes'])} (width × height; "
            f"textured, quality 90, {pp['mean_kb']:.0f} kB on average), read from the page cache. Each configuration in its own process, one thread "
            "(`cv2.setNumThreads(1)`, `torch.set_num_threads(1)`), imports and `CanvasSpec(...).build()` before the clock, 2 images of warm-up; "
            f"`decode_image` then `CanvasSpec((224, 224), {pp['crop_pct']}, '{pp['interpolation']}', mode='crop', backend=..., positions=...).build()` "
            f"(resize to {int(224 / pp['crop_pct'])} on the short side, then the crops), as the loader calls them. Medians of "
            f"{len(raw['decode'])} interleaved repeats; ratios are medians of per-repeat ratios to the decode-alone run of the same repeat "
            "(the decode and preprocessing columns split each run's own clock: decode ± a few % between processes is noise)."
        )
        L.append("")
        L.append(
            "| configuration | crops per image | ms/image | of which decode ms | of which preprocessing ms | ratio to decode alone | images/s |"
        )
        L.append("|---|---|---|---|---|---|---|")
        dms = med([r["per_image_s"] for r in raw["decode"]])
        L.append(
            f"| decode alone (`kaggle_tta.io.data.decode_image`) | — | {ms(dms)} | {ms(dms)} | — | 1.00 | {1 / dms:.0f} |"
        )
        pre_ms: dict[str, float] = {}
        for key, backend, positions in Bench.PREPROCESS_CONFIGS[1:]:
            rs = raw.get(key, [])
            if not rs:
                continue
            t = med([r["per_image_s"] for r in rs])
            pre_ms[key] = med([r["preprocess_per_image_s"] for r in rs])
            ratio = med([r["per_image_s"] / dec[r["rep"]]["per_image_s"] for r in rs if r["rep"] in dec])
            name = f"decode + `{backend}`, {'center' if len(positions) == 1 else 'five_crop'}"
            shape = "×".join(map(str, rs[0]["shapes"][0])) if rs[0].get("shapes") else "?"
            own_dec = med([r["per_image_s"] - r["preprocess_per_image_s"] for r in rs])
            L.append(
                f"| {name} | {len(positions)} ({shape}) | {ms(t)} | {ms(own_dec)} | {ms(pre_ms[key])} | {fmt(ratio)}× | {1 / t:.0f} |"
            )
        L.append("")
        for pos in ("center", "five_crop"):
            t_, a_ = pre_ms.get(f"timm/{pos}"), pre_ms.get(f"albumentations/{pos}")
            if t_ and a_:
                L.append(
                    f"- {pos}: timm's preprocessing (PIL, antialiased) costs {t_ / a_:.2f}× albumentations' (OpenCV) per image."
                )
        L.append("")

    tu = res.get("tune")
    if tu:
        raw, s_ = tu["raw"], tu["setup"]
        bl = med([r["wall_s"] for r in raw["blend"]])
        g = tu["guard"]
        L.append("## Row 9: tune from the cache")
        L.append("")
        L.append(
            f"`kaggle-tta tune` on the re-blend cache (3 members × 8 views of [{s_['rows']}, {s_['classes']}] float16 logits), labels from the "
            "cached logits (one member's top class for 70% of rows, a random class for the rest), given by an override file; default tuners "
            "(GPS views, view weights, temperatures, hill-climbed member weights). Each a fresh CLI process (wall: start and imports included), "
            f"interleaved, medians of {len(raw['blend'])}; the ratio is to one `kaggle-tta blend` of the same labelled pipeline."
        )
        L.append("")
        L.append("| command | wall s | ratio to one re-blend | peak RSS MB |")
        L.append("|---|---|---|---|")
        for key, label in (
            ("blend", "re-blend (`blend`)"),
            ("tune-in-sample", "`tune --folds 0` (in sample only)"),
            ("tune", "`tune` (5-fold estimate, the default)"),
        ):
            w = med([r["wall_s"] for r in raw[key]])
            ratio = med([t["wall_s"] / b_["wall_s"] for t, b_ in zip(raw[key], raw["blend"])])
            L.append(f"| {label} | {w:.1f} | {ratio:.2f}× | {med([r['maxrss_mb'] for r in raw[key]]):.0f} |")
        L.append("")
        no_model = g["rc"] == 0 and not g["torch_imported"]
        L.append(
            f"No model built: the guard run (in-process, `build_model` and `decode_image` patched to raise) exit {g['rc']}, torch "
            f"{'imported' if g['torch_imported'] else 'never imported'} → {ok(no_model)}. Commands: "
            + "; ".join(f"`kaggle-tta {c}`" for c in tu["commands"].values())
        )
        L.append("")
        goals.append(
            (
                "tune builds no model (imports no torch)",
                "torch never imported" if no_model else "torch imported",
                ok(no_model),
            )
        )
        goals.append(
            (
                "tune: seconds and ratio to one re-blend",
                f"{med([r['wall_s'] for r in raw['tune']]):.1f}s, "
                f"{med([t['wall_s'] / b_['wall_s'] for t, b_ in zip(raw['tune'], raw['blend'])]):.1f}× ({bl:.1f}s re-blend)",
                "stated",
            )
        )

    L += ranks.ranks_report(res, goals, med)
    L += adaptive.adaptive_report(res, goals, med)
    L += readers.readers_report(res, goals, med)
    L += process.process_report(res, goals, med)
    if goals:
        L.append("## Goals")
        L.append("")
        L.append("| goal | figure | status |")
        L.append("|---|---|---|")
        for g_, f_, s_ in goals:
            L.append(f"| {g_} | {f_} | {s_} |")
        L.append("")
    L.append(
        "Reproduce: `make bench` (or `python3 benchmarks/run.py --out bench-results`); raw figures in `bench.json`. See benchmarks/README.md."
    )
    return "\n".join(L) + "\n"


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results", help="output folder (bench.md, bench.json, work/ scratch)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 64 images, 1 repeat, small re-blend/memory sets")
    ap.add_argument("--only", default=None, help=f"comma-separated rows to run: {', '.join(ROWS)} (or 1-{len(ROWS)})")
    ap.add_argument("--images", type=int, default=None, help="test images for rows 1-4 (default 512; --quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick 1)")
    ap.add_argument("--views", default="1,2,8,10", help="view counts for rows 1-4, from 1,2,8,10")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where every model runs (limit, kaggle-tta runtime.device, ttach, reference); decoding stays on the CPU",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of each child (default 2 on cpu; on cuda unset: torch's default, and OMP/MKL not limited)",
    )
    ap.add_argument("--forward-batch", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of kaggle-tta and ttach (default: what workers: auto gives, 0 on a CPU of <= 4 cores, cores // 8 above; 8 on cuda)",
    )
    ap.add_argument(
        "--process-images",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[60, 512],
        help="row 13 (process): test-set sizes, comma-separated (default 60,512; #27 also asks 5000)",
    )
    ap.add_argument(
        "--limit-inputs",
        type=int,
        default=None,
        help="inputs timed for the limit (per-input time x views x images; default 512, 4096 on cuda)",
    )
    ap.add_argument(
        "--child-timeout",
        type=float,
        default=None,
        help="kill a measured child after this many seconds (default: none)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="rows 1-4 start no new run after this many seconds from the start; the report uses what was done",
    )
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="rows 1-4: a failed run is reported and skipped instead of ending the rows",
    )
    ap.add_argument(
        "--measure-auto", action="store_true", help="run precision: auto separately even where it resolves to fp32"
    )
    ap.add_argument(
        "--reblend-rows", type=int, default=None, help="rows of the re-blend cache (default 50000; --quick 5000)"
    )
    ap.add_argument(
        "--memory-images",
        default=None,
        help="the two test-set sizes of the memory row (default 500,5000; --quick 100,1000)",
    )
    ap.add_argument("--memory-tta", default="hflip")
    ap.add_argument(
        "--autobatch-images", type=int, default=None, help="images for the forward_batch row (default 256; --quick 64)"
    )
    ap.add_argument("--autobatch-views", type=int, default=8, choices=sorted(PRESET))
    ap.add_argument("--autobatch-repeats", type=int, default=None, help="(default 2; --quick 1)")
    ap.add_argument(
        "--preprocess-images", type=int, default=64, help="camera-sized JPEGs of the preprocessing row (default 64)"
    )
    ap.add_argument(
        "--preprocess-repeats",
        type=int,
        default=None,
        help="interleaved repeats of the preprocessing row (default 3, --quick too)",
    )
    ap.add_argument(
        "--adaptive-images", type=int, default=None, help="test images of the adaptive row (default 10000; --quick 480)"
    )
    ap.add_argument(
        "--adaptive-val",
        type=int,
        default=None,
        help="labelled images the adaptive row learns its gates on (default 6000; --quick 960)",
    )
    ap.add_argument(
        "--ranks-views", type=int, default=2, choices=sorted(PRESET), help="views of the ranks row (default 2)"
    )
    ap.add_argument("--keep", action="store_true", help="keep each run's cache and pipeline under OUT/work/runs")
    a = ap.parse_args(argv)
    q = a.quick
    a.images = a.images or (64 if q else 512)
    a.repeats = a.repeats or (1 if q else 3)
    cuda = a.device == "cuda"
    a.threads = a.threads if a.threads is not None else (None if cuda else 2)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    a.workers = a.workers if a.workers is not None else (8 if cuda else 0 if cores <= 4 else max(1, cores // 8))
    a.limit_inputs = a.limit_inputs or (128 if q else 4096 if cuda else 512)
    a.reblend_rows = a.reblend_rows or (5000 if q else 50000)
    a.memory_images = [int(x) for x in (a.memory_images or ("100,1000" if q else "500,5000")).split(",")]
    a.autobatch_images = a.autobatch_images or (64 if q else 256)
    a.adaptive_images = a.adaptive_images or (480 if q else 10000)
    a.adaptive_val = a.adaptive_val or (960 if q else 6000)
    a.autobatch_repeats = a.autobatch_repeats or (1 if q else 2)
    a.preprocess_repeats = a.preprocess_repeats or max(a.repeats, 3)
    a.views = [int(v) for v in a.views.split(",")]
    bad = [v for v in a.views if v not in PRESET]
    if bad:
        ap.error(f"--views: {bad} not in {sorted(PRESET)}")
    if a.only:
        sel = []
        for part in a.only.split(","):
            part = ROW_NUMBERS.get(part.strip(), part.strip())
            if part not in ROWS:
                ap.error(f"--only: unknown row '{part}'; choose from {', '.join(ROWS)}")
            sel.append(part)
        a.rows = sel
    else:
        a.rows = list(ROWS)
    return a


def main(argv: list[str] | None = None) -> int:
    global CHILD_TIMEOUT
    a = parse_args(argv)
    if a.device == "cuda":  # threads unset: leave OMP/MKL to the libraries too; set: the same number
        _common.CHILD_OMP_THREADS = str(a.threads) if a.threads else None
    CHILD_TIMEOUT = a.child_timeout
    b = Bench(a)
    b.out.mkdir(parents=True, exist_ok=True)
    b.res["load_start"] = loadavg()
    log(
        f"kaggle-tta benchmark → {b.out}; device {a.device}; rows: {', '.join(a.rows)}; {a.images} images, {a.repeats} repeat(s)"
    )
    b.info = machine_info(a.device)
    b.res["machine"] = b.info
    if a.device == "cuda" and not b.info["cuda"]:
        print(
            f"run.py: error: --device cuda, but torch {b.info['torch']} (built for CUDA {b.info.get('torch_cuda_build')}) sees no CUDA device "
            "(torch.cuda.is_available() is False); run with --device cpu",
            file=sys.stderr,
        )
        return 2
    log(
        f"machine: {b.info['cpu']}, {b.info['cores']} cores, torch {b.info['torch']}, device {device_words(b.info)}, precision auto → {b.info['auto_precision']}"
    )
    b.setup()
    rows = set(a.rows)
    failures = []
    steps = [
        (bool(rows & {"limit", "kaggle", "ttach", "reference"}), lambda: b.inference_rows(rows)),
        ("autobatch" in rows, b.autobatch_row),
        ("memory" in rows, b.memory_row),
        ("reblend" in rows, b.reblend_row),
        ("preprocess" in rows, b.preprocess_row),
        ("tune" in rows, b.tune_row),
        ("ranks" in rows, lambda: ranks.ranks_row(b, log, med)),
        ("adaptive" in rows, lambda: adaptive.adaptive_row(b, log, med)),
        ("readers" in rows, lambda: readers.readers_row(b, log, med)),
        ("process" in rows, lambda: process.process_row(b, log, med)),
    ]
    for wanted, fn in steps:
        if not wanted:
            continue
        try:
            fn()
        except ChildFailed as exc:
            failures.append(str(exc))
            log(f"FAILED: {exc}")
    failures = b.failures + failures
    import resource

    b.res["orchestrator_maxrss_mb"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # the floor of every child's peak RSS
    b.res["load_end"] = loadavg()
    b.res["elapsed_min"] = (time.perf_counter() - T_START) / 60
    b.res["failures"] = failures
    (b.out / "bench.json").write_text(json.dumps(b.res, indent=1, default=str))
    md = report(b)
    if failures:
        md += "\n## Failures\n\n" + "\n".join(f"```\n{f[-1500:]}\n```" for f in failures) + "\n"
    (b.out / "bench.md").write_text(md)
    if not a.keep:
        shutil.rmtree(b.runs, ignore_errors=True)
    log(f"wrote {b.out / 'bench.md'}")
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
