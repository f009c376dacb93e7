"""Shared helpers for benchmarks/run.py and benchmarks/_child.py: the synthetic data set, the
random-init checkpoint, pipeline YAMLs and the machine description. Nothing here times anything."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_child.py"

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
N_CLASSES = 1000
# views -> the kaggle-tta preset with that many views
PRESET = {1: "none", 2: "hflip", 8: "d4", 10: "ten_crop"}


# OMP/MKL thread count of every child; None leaves them to the libraries (run.py sets it from
# --threads on --device cuda, where the thread count is not limited by default).
CHILD_OMP_THREADS: str | None = "2"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault(
        "NO_ALBUMENTATIONS_UPDATE", "1"
    )  # children that import albumentations before kaggle_tta (ttach, the reference path)
    # Each measured process sets its own thread count; keep OpenMP from spinning up more.
    if CHILD_OMP_THREADS is not None:
        env.setdefault("OMP_NUM_THREADS", CHILD_OMP_THREADS)
        env.setdefault("MKL_NUM_THREADS", CHILD_OMP_THREADS)
    return env


# ---- data ------------------------------------------------------------------------------------


def write_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n deterministic, vaguely natural RGB JPEGs of size x size (smooth colour fields, noise
    and a few shapes, so decoding costs what a photo of that size costs). Reused if present."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == f"{n} {size} {seed}":
        return folder
    for old in folder.glob("*.jpg"):
        old.unlink()
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        img += rng.normal(0, 10, img.shape).astype(np.float32)
        img = np.clip(img, 0, 255).astype(np.uint8)
        for _ in range(3):
            c = tuple(int(v) for v in rng.integers(0, size, 2))
            r = int(rng.integers(size // 16 + 1, size // 4 + 2))
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, c, r, col, -1)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    marker.write_text(f"{n} {size} {seed}")
    return folder


# (width, height) of the preprocessing row's JPEGs: a 4:3 landscape and a 2:3 portrait photo
PHOTO_SIZES = ((1024, 768), (683, 1024))


def write_photo_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """n deterministic camera-sized RGB JPEGs, alternating PHOTO_SIZES (width x height):
    smooth colour fields, a fine texture at several scales (stripes, a checker of random
    cells, sensor-like noise) and a few shapes with sharp edges, quality 90 — so that the
    JPEG holds detail at every frequency and decodes at about the cost of a photo of that
    size (a flat image decodes much faster). Reused if present."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".complete"
    tag = f"photos {n} {seed} {PHOTO_SIZES}"
    if marker.is_file() and marker.read_text() == tag:
        return folder
    for old in folder.glob("*.jpg"):
        old.unlink()
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for _ in range(3):  # stripes of random period and direction
            period, ang, amp = rng.uniform(3, 40), rng.uniform(0, np.pi), rng.uniform(8, 25)
            img += (amp * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period))[..., None]
        cells = rng.normal(0, 18, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)  # blocky texture
        img += cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)
        img += rng.normal(0, 6, img.shape).astype(np.float32)  # sensor noise
        img = np.clip(img, 0, 255).astype(np.uint8)
        for _ in range(6):
            c = tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h)))
            r = int(rng.integers(min(w, h) // 20, min(w, h) // 5))
            col = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, c, r, col, int(rng.choice([-1, 3, 8])))
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    marker.write_text(tag)
    return folder


def write_classes(path: Path) -> Path:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"c{i:04d}\n" for i in range(N_CLASSES)))
    return path


def write_checkpoint(path: Path) -> Path:
    """timm resnet18 with random weights (seed 0, ``pretrained=False``), saved as safetensors;
    reused if present. Its BatchNorm running statistics are re-estimated on 64 synthetic
    images (weights untouched): with the init statistics (mean 0, var 1) the random network
    puts nearly every image in the same one or two classes, which would make the top-1
    agreement check (auto vs fp32) meaningless."""
    if path.is_file():
        return path
    import cv2
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    calib = write_jpegs(path.parent / "calibration", 64, 256, seed=99)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    xs = []
    for f in sorted(calib.glob("*.jpg")):
        im = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)[16:240, 16:240].astype(np.float32) / 255.0
        xs.append(torch.from_numpy(((im - mean) / std).transpose(2, 0, 1).copy()))
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(xs), 16):
            model(torch.stack(xs[i : i + 16]))
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def member(name: str, checkpoint: Path, views: int | str, size: int = 224) -> dict[str, Any]:
    return {
        "name": name,
        "arch": "resnet18",
        "checkpoint": str(checkpoint),
        "preprocess": {
            "input_size": [3, size, size],
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
        "tta": PRESET[views] if isinstance(views, int) else views,
        "merge": "mean",
    }


def write_pipeline(
    path: Path,
    *,
    data: dict[str, Any],
    classes_file: Path,
    members: list[dict[str, Any]],
    cache_dir: Path,
    submission: Path,
    precision: str,
    forward_batch: int | str,
    batch_size: int,
    workers: int,
    threads: int | None,
    cache_dtype: str = "float32",
    blends: list[dict[str, Any]] | None = None,
    device: str = "cpu",
) -> Path:
    import yaml

    doc = {
        "task": "classification",
        "data": {**data, "classes_file": str(classes_file)},
        "runtime": {
            "device": device,
            "precision": precision,
            "forward_batch": forward_batch,
            "batch_size": batch_size,
            "workers": workers,
            "threads": threads,
        },
        "cache": {"dir": str(cache_dir), "dtype": cache_dtype},
        "members": members,
        "submission": {"path": str(submission), "format": "label"},
    }
    if blends:
        doc["blends"] = blends
        doc["submission"]["source"] = blends[-1]["name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_GPU_INFO = (
    "if dev == 'cuda' and torch.cuda.is_available():\n"
    "    p = torch.cuda.get_device_properties(0)\n"
    "    info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(p.total_memory / 2**30, 1),"
    " gpu_capability='%d.%d' % (p.major, p.minor), gpu_count=torch.cuda.device_count(),"
    " cuda_runtime=torch.version.cuda, cudnn=torch.backends.cudnn.version(),"
    " cuda_bf16=torch.cuda.is_bf16_supported(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,"
    " matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)\n"
    "    try:\n"
    "        import subprocess\n"
    "        info['gpu_driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],"
    " capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]\n"
    "    except Exception:\n"
    "        pass\n"
)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Asked of a child process, so the orchestrator itself never imports torch. With
    device 'cuda': also the GPU (name, memory, capability, CUDA/cuDNN versions), and
    auto_precision is what 'auto' resolves to on that GPU."""
    code = (
        "import json, torch, timm, albumentations, ttach, numpy, cv2\n"
        "from importlib.metadata import version\n"
        "from kaggle_tta.engine.device import cpu_has_native_bf16, resolve_precision\n"
        f"dev = {device!r}\n"
        "info = {'torch': torch.__version__, 'timm': timm.__version__,"
        " 'albumentations': albumentations.__version__, 'ttach': version('ttach'),"
        " 'numpy': numpy.__version__, 'opencv': cv2.__version__,"
        " 'cuda': torch.cuda.is_available(), 'native_bf16': cpu_has_native_bf16(),"
        " 'auto_precision': resolve_precision('auto', torch.device(dev if dev == 'cpu' or torch.cuda.is_available() else 'cpu')),"
        " 'torch_default_threads': torch.get_num_threads(), 'torch_cuda_build': torch.version.cuda}\n"
        + _GPU_INFO
        + "print(json.dumps(info))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"machine_info: the probe process failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["device"] = device
    flags = _cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    info.update(
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        simd=simd,
        memory_gb=round(mem_gb, 1),
        python=platform.python_version(),
        os=f"{platform.system()} {platform.release()}",
        date=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
