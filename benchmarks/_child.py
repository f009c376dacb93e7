"""One measured configuration, in its own process: ``python3 _child.py KIND 'SPEC-JSON'``.

Every kind imports its libraries first and starts its clock after the imports, so the in-process
seconds compare the work itself (the orchestrator also records the process wall time and peak RSS
of each child). The last stdout line is ``RESULT {json}``.

``spec["device"]`` ("cpu", the default, or "cuda") is where the model runs. On cuda every kind
that runs a model creates the CUDA context before its clock starts, as it imports its libraries
(a one-off cost of the process that every tool pays alike), and synchronizes before it reads a
clock. ``spec["threads"]`` None leaves torch's intra-op thread count as it is.

Kinds:
  limit        the model's forward alone on ready tensors, at a forward batch and precision
  kaggle       kaggle_tta.cli.main(['run', PIPELINE, '-q']) (== ``kaggle-tta run PIPELINE -q``)
  ttach        ttach.ClassificationTTAWrapper over a DataLoader, same model/batch/precision
  reference    the reference document's per-image albumentations path, fp32
  blend-guard  ``kaggle-tta blend`` with timm.create_model and build_model made to raise;
               with ``"verify": false`` CacheEntry.rows bypassed (no finiteness check, no CRC)
  numpy-blend  np.load the cached views, average, argmax, write a CSV
  reblend-setup  write 3 members x N views of [rows, 1000] float16 logits into the cache
  tune-labels  labels for the re-blend cache: m1's top class for 70% of rows, random otherwise
  tune-guard   ``kaggle-tta tune`` with build_model and decode_image made to raise; torch imported?
  preprocess   decode (kaggle_tta.io.data.decode_image) alone, or decode + a CanvasSpec crop
               backend (timm | albumentations), per image, one thread
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def _result(d: dict) -> None:
    print("RESULT " + json.dumps(d), flush=True)


def _device(spec: dict) -> str:
    """The spec's device; on cuda, checks that there is one and creates the CUDA context now
    (called before the clock starts, like the imports)."""
    device = spec.get("device", "cpu")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"device cuda asked for, but torch {torch.__version__} sees no CUDA device")
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    return device


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _load_model(checkpoint: str, threads: int | None, device: str = "cpu"):
    import timm
    import torch
    from safetensors.torch import load_file

    if threads:
        torch.set_num_threads(threads)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    model.load_state_dict(load_file(checkpoint, device="cpu"), strict=True)
    return model.eval().to(device)


def _precision(setting: str, device: str = "cpu") -> tuple[str, tuple[bool, ...]]:
    """Resolved precision and the channels_last values to use, by kaggle_tta's engine rules
    (runtime.channels_last auto: on with CUDA or reduced precision; timed on a CPU in fp32)."""
    import torch

    from kaggle_tta.engine.device import resolve_precision
    from kaggle_tta.exec.chunks import layout_candidates

    p = resolve_precision(setting, torch.device(device))
    return p, layout_candidates("auto", torch.device(device), p)


def _per_input(model, x, precision: str, device: str, chunks: int, warmup: int = 2) -> float:
    """Seconds per input of ``model(x)`` on ready tensors: ``warmup`` untimed calls, then ``chunks``."""
    import torch

    with torch.inference_mode(), _autocast(precision, device):
        for _ in range(warmup):
            model(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(chunks):
            model(x).float()
        _sync(device)
    return (time.perf_counter() - t0) / (chunks * x.shape[0])


def _with_layout(model, x, channels_last: bool):
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt), x.contiguous(memory_format=fmt)


def _fastest_layout(
    model, x, layouts: tuple[bool, ...], precision: str, device: str, chunks: int, warmup: int
) -> tuple[bool, dict[bool, float]]:
    """Seconds per input in each layout (the model is left in the last one) and the fastest."""
    per = {cl: _per_input(*_with_layout(model, x, cl), precision, device, chunks, warmup) for cl in layouts}
    return min(per, key=per.get), per  # type: ignore[arg-type]


def _model_for(spec: dict, device: str):
    """The spec's model on the device, its resolved precision and whether channels_last is on
    (then already applied to the model): what the ttach row starts from. Where the engine
    would time both layouts, the faster on a few ready chunks is taken (outside the clock:
    ttach gets the best layout for free)."""
    import torch

    model = _load_model(spec["checkpoint"], spec["threads"], device)
    precision, layouts = _precision(spec["precision"], device)
    pick_s = 0.0
    if len(layouts) > 1:
        t0 = time.perf_counter()
        x = torch.randn(spec["forward_batch"], 3, 224, 224).to(device)
        layouts = (_fastest_layout(model, x, layouts, precision, device, chunks=2, warmup=1)[0],)
        pick_s = time.perf_counter() - t0
    model, _ = _with_layout(model, torch.empty(1, 3, 1, 1), layouts[0])
    return model, precision, layouts[0], pick_s


def _autocast(precision: str, device: str = "cpu"):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


# ---- 1. the limit ----------------------------------------------------------------------------


def limit(spec: dict) -> None:
    import torch

    device = _device(spec)
    t_build = time.perf_counter()
    model = _load_model(spec["checkpoint"], spec["threads"], device)
    precision, layouts = _precision(spec["precision"], device)
    _sync(device)
    build_s = time.perf_counter() - t_build
    fb, size = spec["forward_batch"], spec.get("size", 224)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(fb, 3, size, size, generator=g).to(device)
    chunks = max(1, -(-spec["inputs"] // fb))
    # Where the engine times both layouts, the limit is the faster of the two: the pipeline is
    # held to the best the model can do, not to the layout it happened to pick.
    best, per = _fastest_layout(model, x, layouts, precision, device, chunks, spec.get("warmup", 2))
    eager = per[best]
    compiled, compile_s = None, None
    if spec.get("compile", True):  # the compiled forward, in the faster layout (#27: the limit is the best)
        model, xc = _with_layout(model, x, best)
        t0 = time.perf_counter()
        program = torch.compile(model, dynamic=False)
        with torch.inference_mode(), _autocast(precision, device):
            program(xc)
        _sync(device)
        compile_s = time.perf_counter() - t0
        compiled = _per_input(program, xc, precision, device, chunks, spec.get("warmup", 2))
    top = min(eager, compiled) if compiled is not None else eager
    _result(
        {
            "seconds": top * chunks * fb,
            "inputs": chunks * fb,
            "per_input": top,
            "per_input_eager": eager,
            "per_input_compiled": compiled,
            "compile_s": compile_s,
            "precision": precision,
            "build_s": build_s,
            "channels_last": best,
            "per_input_by_layout": {str(k): v for k, v in per.items()},
        }
    )


# ---- 2. kaggle-tta end to end ----------------------------------------------------------------


def kaggle(spec: dict) -> None:
    # What `python3 -m kaggle_tta run` would import on its way; imported before the clock.
    import albumentations  # noqa: F401
    import cv2  # noqa: F401
    import polars  # noqa: F401
    import safetensors.torch  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401

    import kaggle_tta.engine.stream  # noqa: F401
    from kaggle_tta import api, cli

    # The CLI as a user runs it; what it computed is read from the RunStats that kaggle_tta.run
    # returns to it (kept on the way through), not parsed from what it prints.
    kept: dict = {}
    real_run = api.run

    def run_and_keep(*a, **k):
        kept["result"] = real_run(*a, **k)
        return kept["result"]

    api.run = run_and_keep
    _device(spec)  # the pipeline's runtime.device says the same; CUDA context before the clock
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["run", spec["pipeline"], "-q"])
    secs = time.perf_counter() - t0
    out = buf.getvalue()
    stats = kept["result"].stats if "result" in kept else None
    computed = [m for m in stats.members.values() if m.views_computed] if stats else []
    first = computed[0] if computed else None  # the first member that ran (per member: 32/64)
    _result(
        {
            "rc": rc,
            "seconds": secs,
            "images": stats.rows_computed if stats else None,
            "precision": (getattr(first, "precision", None) or stats.precision)
            if stats
            else None,  # the member's: auto may differ per member
            "forward_batch": first.forward_batch if first else None,
            "inference_s": stats.seconds if stats else None,
            "channels_last": first.channels_last if first else None,
            "submission": spec["submission"],
            "stdout_tail": out[-600:] if rc else "",
        }
    )


# ---- 3. ttach --------------------------------------------------------------------------------


class _AlbuFolder:
    def __init__(self, paths: list[str], canvas: int, crop: int):
        self.paths, self.canvas, self.crop = paths, canvas, crop
        self.t = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import albumentations as A
        import cv2
        from albumentations.pytorch import ToTensorV2

        if self.t is None:
            self.t = A.Compose(
                [
                    A.SmallestMaxSize(max_size=self.canvas, interpolation=cv2.INTER_LINEAR),
                    A.CenterCrop(self.crop, self.crop),
                    A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
                    ToTensorV2(),
                ]
            )
        img = cv2.cvtColor(cv2.imread(self.paths[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return self.t(image=img)["image"]


def _worker_init(_: int) -> None:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _write_labels(path: str, ids: list[str], top: object) -> None:
    with open(path, "w") as f:
        f.write("id,label\n")
        for i, k in zip(ids, top.tolist()):  # type: ignore[attr-defined]
            f.write(f"{i},c{k:04d}\n")


def run_ttach(spec: dict) -> None:
    import albumentations  # noqa: F401
    import cv2  # noqa: F401
    import torch
    import ttach as tta
    from torch.utils.data import DataLoader

    paths = sorted(str(p) for p in Path(spec["folder"]).glob("*.jpg"))
    device = _device(spec)
    t0 = time.perf_counter()
    model, precision, cl, pick_s = _model_for(spec, device)
    views = spec["views"]
    transforms = {
        1: lambda: tta.Compose([]),
        2: tta.aliases.hflip_transform,
        8: tta.aliases.d4_transform,
        10: lambda: tta.aliases.ten_crop_transform(224, 224),
    }[views]()
    assert len(transforms) == views, (len(transforms), views)
    wrapper = tta.ClassificationTTAWrapper(model, transforms, merge_mode="mean")
    crop = 256 if views == 10 else 224  # ten_crop takes its crops from the 256 canvas
    ds = _AlbuFolder(paths, 256, crop)
    w = spec["workers"]
    cuda = device == "cuda"
    loader = DataLoader(
        ds,
        batch_size=spec["forward_batch"],
        shuffle=False,
        num_workers=w,
        worker_init_fn=_worker_init if w else None,
        prefetch_factor=2 if w else None,
        **({"pin_memory": True} if cuda else {}),
    )
    outs = []
    with torch.inference_mode(), _autocast(precision, device):
        for x in loader:
            if cuda:
                x = x.to(device, non_blocking=True)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(wrapper(x).float())
    logits = torch.cat(outs).cpu().numpy()
    _write_labels(spec["submission"], [Path(p).stem for p in paths], logits.argmax(1))
    secs = time.perf_counter() - t0 - pick_s
    _result({"seconds": secs, "images": len(paths), "precision": precision, "channels_last": cl})


# ---- 4. the reference document's path ---------------------------------------------------------


def reference(spec: dict) -> None:
    """As in the reference document (test-time-augmentation.md): PIL decode, then per image
    and per view albumentations SmallestMaxSize(256), CenterCrop(224), Normalize, ToTensorV2
    (ten-crop: SmallestMaxSize(256), five A.Crop boxes and their HorizontalFlip), the views of
    one image stacked into one fp32 forward under torch.no_grad, logits averaged. On cuda the
    preprocessing stays on the CPU, the stacked views are moved to the GPU for the forward."""
    import albumentations as A
    import numpy as np
    import torch
    from albumentations.pytorch import ToTensorV2
    from PIL import Image

    paths = sorted(str(p) for p in Path(spec["folder"]).glob("*.jpg"))
    views = spec["views"]
    device = _device(spec)
    t0 = time.perf_counter()
    model = _load_model(spec["checkpoint"], spec["threads"], device)

    base = A.Compose(
        [
            A.SmallestMaxSize(max_size=256),
            A.CenterCrop(height=224, width=224),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ]
    )
    normalize = A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])
    flip = A.HorizontalFlip(p=1.0)
    d4 = [  # the document's D4 list
        A.Compose([]),
        A.HorizontalFlip(p=1.0),
        A.VerticalFlip(p=1.0),
        A.Compose([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)]),
        A.Compose([A.Transpose(p=1.0)]),
        A.Compose([A.Transpose(p=1.0), A.HorizontalFlip(p=1.0)]),
        A.Compose([A.Transpose(p=1.0), A.VerticalFlip(p=1.0)]),
        A.Compose([A.Transpose(p=1.0), A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)]),
    ]
    resize256 = A.SmallestMaxSize(max_size=256)

    def inputs(image: np.ndarray) -> list[torch.Tensor]:
        if views == 1:
            return [base(image=image)["image"]]
        if views == 2:
            return [base(image=image)["image"], base(image=flip(image=image)["image"])["image"]]
        if views == 8:
            return [base(image=t(image=image)["image"])["image"] for t in d4]
        image_resized = resize256(image=image)["image"]
        h, w = image_resized.shape[:2]
        cs = 224
        boxes = [
            [0, 0, cs, cs],
            [w - cs, 0, w, cs],
            [0, h - cs, cs, h],
            [w - cs, h - cs, w, h],
            [(w - cs) // 2, (h - cs) // 2, (w + cs) // 2, (h + cs) // 2],
        ]
        crops = []
        for x_min, y_min, x_max, y_max in boxes:
            crop = A.Crop(x_min=x_min, y_min=y_min, x_max=x_max, y_max=y_max)(image=image_resized)["image"]
            crops.append(normalize(image=crop)["image"])
            crops.append(normalize(image=flip(image=crop)["image"])["image"])
        return crops

    top = []
    for p in paths:
        image = np.array(Image.open(p).convert("RGB"))
        x = torch.stack(inputs(image)).to(device)
        with torch.no_grad():
            logits = model(x).mean(dim=0, keepdim=True)
        top.append(int(logits.argmax(dim=1)))
    _write_labels(spec["submission"], [Path(p).stem for p in paths], np.array(top))
    secs = time.perf_counter() - t0
    _result({"seconds": secs, "images": len(paths), "precision": "fp32"})


# ---- 5. re-blend -----------------------------------------------------------------------------


def reblend_setup(spec: dict) -> None:
    """Writes each member's views into its cache entry through CacheEntry's own API
    (``write_ids``, ``open_for_write``, ``record``, ``commit``), in the layout and under the
    fingerprint kaggle-tta itself uses (plan.build_plan + cache.CacheEntry), so that
    ``kaggle-tta blend`` finds them complete and intact: cache format 2, ``ids.json`` as
    ``write_ids`` writes it, a ``crc32`` per view recorded by ``commit``. Reuses entries that
    are already complete in that format; an entry of an older format (or a view without its
    CRC) is written again. Checks, before it returns, that every manifest is format 2 with a
    crc32 per view and that ``ids.json`` holds the test set's ids in order."""
    import shutil

    import numpy as np
    import torch

    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.cache.entry import FORMAT_VERSION
    from kaggle_tta.config import load_pipeline
    from kaggle_tta.config.errors import CacheError
    from kaggle_tta.engine.device import resolve_precision
    from kaggle_tta.engine.plan import build_plan

    cfg = load_pipeline(spec["pipeline"])
    plan = build_plan(cfg)
    precision = resolve_precision(cfg.runtime.precision, torch.device("cpu"))
    n, c = len(plan.testset), len(plan.classes)
    ids = list(plan.testset.ids)
    rng = np.random.default_rng(0)
    written = reused = rewritten_entries = 0
    t0 = time.perf_counter()

    def open_entry(m):
        nonlocal rewritten_entries
        try:
            return CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)
        except CacheError:  # an older cache format (a benchmark folder from before format 2)
            shutil.rmtree(plan.cache_root / m.name / m.fingerprint(precision), ignore_errors=True)
            rewritten_entries += 1
            return CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)

    def good(entry, view: str) -> bool:
        return entry.is_complete(view) and "crc32" in entry.view_state(view)

    for m in plan.members:
        entry = open_entry(m)
        if all(good(entry, v.name) for v in m.views) and (entry.dir / "ids.json").is_file():
            reused += len(m.views)
            continue
        entry.write_ids(ids)
        for v in m.views:
            if good(entry, v.name):
                reused += 1
                continue
            entry.manifest["views"].pop(v.name, None)  # complete without a CRC: write it again
            arr, _ = entry.open_for_write(v.name, (n, c), cfg.cache.dtype)
            step = 5000
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                arr[lo:hi] = (rng.standard_normal((hi - lo, c), dtype=np.float32) * 3.0).astype(arr.dtype)
            entry.record(v.name, n, 0.0)
            entry.commit()  # all rows in: records the view's CRC-32 and moves it into place
            del arr
            written += 1
        entry.close()
    # what blend will check: format 2 manifests, a crc32 per view, ids.json as write_ids writes it
    entries = [CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs) for m in plan.members]
    for m, e in zip(plan.members, entries):
        man = json.loads(e.manifest_path.read_text(encoding="utf-8"))
        if man.get("format_version") != FORMAT_VERSION:
            raise SystemExit(f"{e.manifest_path}: format {man.get('format_version')}, not {FORMAT_VERSION}")
        lacking = [
            v.name
            for v in m.views
            if man["views"].get(v.name, {}).get("status") != "complete" or "crc32" not in man["views"][v.name]
        ]
        if lacking:
            raise SystemExit(f"{e.manifest_path}: views without a recorded crc32 or not complete: {lacking}")
        on_disk = (e.dir / "ids.json").read_text(encoding="utf-8")
        if on_disk != json.dumps(ids, ensure_ascii=False) or e.read_ids() != ids:
            raise SystemExit(f"{e.dir / 'ids.json'}: not what CacheEntry.write_ids writes for the test set")
    files = [str(e.path(v.name)) for m, e in zip(plan.members, entries) for v in m.views]
    ids_file = str(entries[0].dir / "ids.json")  # the row order, as JSON (cache format 2)
    _result(
        {
            "written": written,
            "reused": reused,
            "rewritten_old_entries": rewritten_entries,
            "seconds": time.perf_counter() - t0,
            "files": files,
            "ids": ids_file,
            "format_version": FORMAT_VERSION,
            "crc32_views": sum(len(m.views) for m in plan.members),
            "bytes": sum(Path(f).stat().st_size for f in files),
            "bytes_data": n * c * np.dtype(cfg.cache.dtype).itemsize * len(files),
            "rows": n,
            "classes": c,
            "precision": precision,
        }
    )


def blend_guard(spec: dict) -> None:
    """`kaggle-tta blend` with every way of building a model made to raise.

    ``spec["verify"]`` False bypasses the streaming verification: ``CacheEntry.rows`` becomes
    ``self.read(view)[lo:hi]`` (no finiteness check, no CRC-32), the rest of the blend as is.
    Either way the bytes that went through the CRC (``kaggle_tta.cache.entry.data_crc``) and
    the verified blocks are counted, so the report can show that the verified run checked every
    byte of every view and the bypassed one none."""
    import timm
    import torch

    import kaggle_tta.cache.entry as entry_mod
    import kaggle_tta.io.models as models
    from kaggle_tta import cli

    crc_bytes = [0]
    real_crc = entry_mod.data_crc

    def counting_crc(arr, crc=0):
        crc_bytes[0] += arr.nbytes
        return real_crc(arr, crc)

    entry_mod.data_crc = counting_crc
    verify = spec.get("verify", True)
    if not verify:

        def unverified_rows(self, view, lo, hi):
            return self.read(view)[lo:hi]

        entry_mod.CacheEntry.rows = unverified_rows

    calls = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise RuntimeError("blend built a model")

    timm.create_model = refuse
    models.build_model = refuse
    orig_init = torch.nn.Module.__init__
    n_modules = [0]

    def counting_init(self, *a, **k):
        n_modules[0] += 1
        orig_init(self, *a, **k)

    torch.nn.Module.__init__ = counting_init
    engine_before = "kaggle_tta.engine.stream" in sys.modules
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["blend", spec["pipeline"]])  # blend shows no bar: it takes no --quiet
    secs = time.perf_counter() - t0
    _result(
        {
            "rc": rc,
            "seconds": secs,
            "model_calls": len(calls),
            "nn_modules_created": n_modules[0],
            "verify": verify,
            "crc_bytes": crc_bytes[0],
            "engine_imported": (not engine_before) and "kaggle_tta.engine.stream" in sys.modules,
            "stdout_tail": buf.getvalue()[-400:],
        }
    )


def numpy_blend(spec: dict) -> None:
    """The baseline: read every cached view with np.load, average all of them (float32
    accumulator), argmax, write id,label to a CSV."""
    import numpy as np

    t0 = time.perf_counter()
    classes = Path(spec["classes"]).read_text().split()
    ids = json.loads(Path(spec["ids"]).read_text(encoding="utf-8"))
    acc = None
    for f in spec["files"]:
        a = np.load(f)
        if acc is None:
            acc = a.astype(np.float32)
        else:
            acc += a
    acc /= len(spec["files"])
    top = acc.argmax(axis=1)
    names = np.asarray(classes, dtype=object)[top]
    with open(spec["out"], "w") as fh:
        fh.write("id,label\n")
        fh.write("".join(f"{i},{c}\n" for i, c in zip(ids, names)))
    _result({"seconds": time.perf_counter() - t0, "rows": len(ids)})


# ---- 8. preprocessing backends -------------------------------------------------------------


def preprocess(spec: dict) -> None:
    """Per image: ``decode_image`` alone (``spec["backend"]`` None) or decode + the crops of
    ``CanvasSpec(size, crop_pct, interpolation, mode="crop", backend, positions).build()``,
    exactly as the loader calls them. One thread (cv2 and torch), everything imported and the
    transform built before the clock; ``warmup`` images are run untimed first. Returns the
    per-image seconds of the whole (decode + preprocessing) and of the preprocessing alone."""
    import cv2
    import numpy as np
    import torch

    from kaggle_tta.io.canvas import CanvasSpec
    from kaggle_tta.io.data import decode_image

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    paths = sorted(str(p) for p in Path(spec["folder"]).glob("*.jpg"))
    backend = spec.get("backend")
    fn = None
    build_s = 0.0
    if backend:
        import albumentations  # noqa: F401
        import PIL.Image  # noqa: F401
        import timm.data  # noqa: F401

        t0 = time.perf_counter()
        cs = CanvasSpec(
            tuple(spec["size"]),
            spec["crop_pct"],
            spec["interpolation"],
            mode="crop",
            backend=backend,
            positions=tuple(spec["positions"]),
        )
        fn = cs.build()
        build_s = time.perf_counter() - t0
    for p in paths[: spec.get("warmup", 2)]:
        img = decode_image(p)
        if fn is not None:
            fn(img)
    total = pre = 0.0
    shapes = set()
    check = 0
    for p in paths:
        t0 = time.perf_counter()
        img = decode_image(p)
        t1 = time.perf_counter()
        if fn is not None:
            out = fn(img)
            t2 = time.perf_counter()
            pre += t2 - t1
            total += t2 - t0
            shapes.add(tuple(out.shape))
            check += int(out[:, ::37, ::37].astype(np.int64).sum())
        else:
            total += t1 - t0
            shapes.add(tuple(img.shape))
    n = len(paths)
    _result(
        {
            "images": n,
            "per_image_s": total / n,
            "preprocess_per_image_s": pre / n if fn is not None else 0.0,
            "build_s": build_s,
            "shapes": sorted(map(list, shapes)),
            "checksum": check,
            "cv2_threads": cv2.getNumThreads(),
            "torch_threads": torch.get_num_threads(),
        }
    )


def setup(spec: dict) -> None:
    """Writes the data and the checkpoint here, so the orchestrator never imports numpy, cv2
    or torch: a child's peak RSS (wait4) starts from the size of the process that forked it."""
    from _common import write_checkpoint, write_classes, write_jpegs, write_photo_jpegs

    t0 = time.perf_counter()
    for folder, n, size, seed in spec.get("jpegs", []):
        write_jpegs(Path(folder), n, size, seed)
    for folder, n, seed in spec.get("photos", []):
        write_photo_jpegs(Path(folder), n, seed)
    if spec.get("classes"):
        write_classes(Path(spec["classes"]))
    if spec.get("checkpoint"):
        write_checkpoint(Path(spec["checkpoint"]))
    _result({"seconds": time.perf_counter() - t0})


def tune_labels(spec: dict) -> None:
    """labels.csv for the re-blend cache: the top class of member m1's mean logits for 70% of
    the rows (seed 0), a random class for the rest, so that tuning has something to learn."""
    import numpy as np

    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.config import load_pipeline
    from kaggle_tta.engine.plan import build_plan

    t0 = time.perf_counter()
    plan = build_plan(load_pipeline(spec["pipeline"]))
    m = plan.members[0]
    entry = next(
        e
        for e in (CacheEntry(plan.cache_root, m.name, m.fingerprint(p), m.inputs) for p in ("fp32", "bf16", "fp16"))
        if all(e.is_complete(v.name) for v in m.views)
    )
    acc = None
    for v in m.views:
        x = np.asarray(entry.read(v.name), dtype=np.float32)
        acc = x if acc is None else acc.__iadd__(x)
    top = acc.argmax(axis=1)
    rng = np.random.default_rng(0)
    y = np.where(rng.random(len(top)) < 0.7, top, rng.integers(0, acc.shape[1], len(top)))
    names = Path(spec["classes"]).read_text().split()
    with open(spec["out"], "w") as fh:
        fh.write("id,label\n" + "".join(f"{i},{names[k]}\n" for i, k in zip(plan.testset.ids, y)))
    _result({"seconds": time.perf_counter() - t0, "rows": len(y)})


def tune_guard(spec: dict) -> None:
    """``kaggle-tta tune`` in-process with build_model and decode_image raising; whether
    torch was imported at all (tune must not: re-blending imports no torch)."""
    import kaggle_tta.io.data as data
    import kaggle_tta.io.models as models
    from kaggle_tta import cli

    def refuse(*a, **k):
        raise RuntimeError("tune built a model or read an image")

    data.decode_image = models.build_model = refuse
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(
            ["tune", spec["pipeline"], "--overrides", spec["overrides"], "--out", spec["out"], "--folds", "0"]
        )
    _result(
        {
            "rc": rc,
            "seconds": time.perf_counter() - t0,
            "torch_imported": "torch" in sys.modules,
            "stdout_tail": buf.getvalue()[-400:],
        }
    )


KINDS = {
    "setup": setup,
    "limit": limit,
    "kaggle": kaggle,
    "ttach": run_ttach,
    "reference": reference,
    "reblend-setup": reblend_setup,
    "blend-guard": blend_guard,
    "numpy-blend": numpy_blend,
    "preprocess": preprocess,
    "tune-labels": tune_labels,
    "tune-guard": tune_guard,
}

if __name__ == "__main__":
    KINDS[sys.argv[1]](json.loads(sys.argv[2]))
