"""One member's work on one batch, per task: views on the device, forward chunks, inverses.

The engine (engine.py) owns the loop, the loader, the models and the cache entries; a step
takes a batch of decoded canvases, fills rows ``lo:hi`` of every pending view and records them.

- classification: view inputs of equal size are packed into chunks across views; logits
  ``[N, C]`` are stored as they come (every view leaves the label unchanged).
- segmentation: the canvas is cut into tiles (one tile when there is no tiling), each view
  is applied per tile, the predicted map is resized to the view's input size where the model
  predicts at a lower resolution, inverted, and stitched with the tile weights into a map of
  the canvas' size; stored ``[N, K, h, w]`` as float32/float16 logits or uint8 probabilities,
  optionally at a reduced resolution.
- detection: the adapter's boxes (input pixels) are normalized, inverted per view, and stored
  as ragged rows ``[x1, y1, x2, y2, score, label]``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kaggle_tta.cache import IMAGE_SIZE
from kaggle_tta.data import decode_image
from kaggle_tta.errors import CheckpointError, DataError
from kaggle_tta.tasks.tiling import tile_origins, tile_weight

if TYPE_CHECKING:
    from kaggle_tta.engine import _Pending
    from kaggle_tta.plan import Plan



def map_size(plan: Plan, first_path: Any) -> tuple[int, int]:
    """The canvas (H, W) of a segmentation run: segmentation.size, or the first image's."""
    size = plan.cfg.segmentation.size
    if size:
        return int(size[0]), int(size[1])
    return tuple(decode_image(first_path).shape[:2])  # type: ignore[return-value]


def stored_size(plan: Plan, canvas: tuple[int, int]) -> tuple[int, int]:
    s = plan.cfg.cache.scale
    return (max(1, round(canvas[0] * s)), max(1, round(canvas[1] * s))) if s != 1.0 else canvas


def open_views(p: _Pending, plan: Plan) -> None:
    """Opens (or reopens) the cache files of every pending view of member ``p``."""
    n = len(plan.testset)
    task = plan.cfg.task
    entry = p.entry
    if task != "classification" and not entry.is_complete(IMAGE_SIZE):  # a complete one is kept as it is
        p.arrays[IMAGE_SIZE], p.start[IMAGE_SIZE] = entry.open_for_write(IMAGE_SIZE, (n, 2), "int32")
    if task == "classification":
        shape: tuple[int, ...] = (n, p.member.out_channels)
    elif task == "segmentation":
        p.canvas_size = map_size(plan, plan.testset.paths[0])
        shape = (n, p.member.out_channels, *stored_size(plan, p.canvas_size))
    for v in p.views:
        if task == "detection":
            p.arrays[v.name], p.start[v.name] = entry.open_ragged(v.name, n)
        else:
            p.arrays[v.name], p.start[v.name] = entry.open_for_write(v.name, shape, plan.cfg.cache.dtype)


def _normalize(canvas: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    """uint8 [B, H, W, C] -> normalized float [B, C, H, W] on the device."""
    x = canvas.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    return ((x - m) / s).contiguous()


def _record(p: _Pending, hi: int, seconds: dict[str, float], recomputed: dict[str, int], sizes: Tensor, lo: int) -> None:
    """Marks rows up to ``hi`` done for every view (and the image sizes) that needed them, with
    the view's forward seconds and its chunks recomputed in fp32 for this batch."""
    if IMAGE_SIZE in p.start and p.start[IMAGE_SIZE] < hi:
        first = p.start[IMAGE_SIZE]
        p.arrays[IMAGE_SIZE][first:hi] = sizes[first - lo :].numpy()
        p.start[IMAGE_SIZE] = hi
        p.entry.record(IMAGE_SIZE, hi, 0.0)
    for v in p.views:
        if p.start[v.name] < hi:
            p.start[v.name] = hi
            p.entry.record(v.name, hi, seconds[v.name], recomputed[v.name])


# ---- classification ------------------------------------------------------------------------


def _chunks(p: _Pending, x: Tensor, lo: int, hi: int, size_fn: Callable[[], int]) -> Iterator[tuple[Tensor, list[tuple[str, int, int]]]]:
    """Packs (view, rows) pieces of equal input size into chunks of the current size.

    Yields the stacked input and, per piece, (view name, first row, row count).
    """
    by_size: dict[tuple[int, ...], list] = defaultdict(list)
    for v in p.views:
        first = max(lo, p.start[v.name])
        if first < hi:
            by_size[tuple(v.out_size(tuple(x.shape[-2:])))].append((v, first))
    for group in by_size.values():
        buf: list[Tensor] = []
        meta: list[tuple[str, int, int]] = []
        filled = 0
        for v, first in group:
            xv = v.apply(x[first - lo :])
            off = 0
            while off < xv.shape[0]:
                take = min(size_fn() - filled, xv.shape[0] - off)
                buf.append(xv[off : off + take])
                meta.append((v.name, first + off, take))
                filled += take
                off += take
                if filled >= size_fn():
                    yield (torch.cat(buf) if len(buf) > 1 else buf[0]), meta
                    buf, meta, filled = [], [], 0
        if buf:
            yield (torch.cat(buf) if len(buf) > 1 else buf[0]), meta


def classify_step(p: _Pending, canvas: Tensor, sizes: Tensor, lo: int, hi: int, device: torch.device, plan: Plan) -> None:
    pre = p.member.preprocess
    n_classes = p.member.out_channels
    runner = p.runner
    assert runner is not None
    x = _normalize(canvas, pre.mean, pre.std, device)
    seconds: dict[str, float] = defaultdict(float)
    recomputed: dict[str, int] = defaultdict(int)
    for inp, meta in _chunks(p, x, lo, hi, lambda: runner.sizer.current):
        t = time.perf_counter()
        out = runner(inp)
        if out.dim() != 2 or out.shape[1] != n_classes:
            raise CheckpointError(
                f"members.{p.member.name}: the model outputs shape {tuple(out.shape)}, expected [N, {n_classes}] "
                "(one logit per class in data.classes)"
            )
        res = out.cpu().numpy()
        dt = time.perf_counter() - t
        off = 0
        for name, first, count in meta:
            arr = p.arrays[name]
            chunk = res[off : off + count]
            if arr.dtype == np.float16:
                chunk = np.clip(chunk, -65504, 65504)
            arr[first : first + count] = chunk
            seconds[name] += dt * count / inp.shape[0]
            recomputed[name] += runner.last_recomputed
            off += count
    _record(p, hi, seconds, recomputed, sizes, lo)


# ---- segmentation --------------------------------------------------------------------------


def segment_step(p: _Pending, canvas: Tensor, sizes: Tensor, lo: int, hi: int, device: torch.device, plan: Plan) -> None:
    """Tiles x views -> forward -> resize to the view input -> invert -> stitch -> store."""
    m = p.member
    runner = p.runner
    assert runner is not None
    pre = m.preprocess
    x = _normalize(canvas, pre.mean, pre.std, device)
    size = tuple(x.shape[-2:])
    if size != tuple(p.canvas_size):
        raise DataError(
            f"{plan.testset.paths[lo]}: canvas {size[0]}x{size[1]} differs from the first image's "
            f"{p.canvas_size[0]}x{p.canvas_size[1]}; set segmentation.size: [H, W] to resize every image"
        )
    tiling = m.cfg.tiling
    origins = tile_origins(size, tiling.size, tiling.overlap) if tiling else [(0, 0)]
    th, tw = (min(tiling.size[0], size[0]), min(tiling.size[1], size[1])) if tiling else size
    n_tiles = len(origins)
    weight = torch.from_numpy(tile_weight((th, tw), tiling.weight, tiling.sigma)).to(device) if n_tiles > 1 else None
    # [B * T, C, th, tw], image-major: tile row r is image r // T, tile r % T.
    xt = torch.stack([x[:, :, t : t + th, l : l + tw] for t, l in origins], 1).flatten(0, 1) if n_tiles > 1 else x
    k = m.out_channels
    dtype = plan.cfg.cache.dtype
    seconds: dict[str, float] = defaultdict(float)
    recomputed: dict[str, int] = defaultdict(int)
    for v in p.views:
        first = max(lo, p.start[v.name])
        if first >= hi:
            continue
        n_img = hi - first
        acc = torch.zeros((n_img, k, *size), device=device)
        wsum = torch.zeros((n_img, 1, *size), device=device) if weight is not None else None
        xv = xt[(first - lo) * n_tiles :]
        view_in = tuple(v.out_size((th, tw)))
        off = 0
        while off < xv.shape[0]:
            take = min(runner.sizer.current, xv.shape[0] - off)
            t0 = time.perf_counter()
            out = runner(v.apply(xv[off : off + take]))
            recomputed[v.name] += runner.last_recomputed
            if out.dim() != 4 or out.shape[1] != k:
                raise CheckpointError(
                    f"members.{m.name}: the model outputs shape {tuple(out.shape)}, expected [N, {k}, h, w] "
                    f"({'background + ' if k > len(plan.classes) else ''}one channel per class in data.classes, activation {m.activation})"
                )
            if tuple(out.shape[-2:]) != view_in:  # a model predicting at a stride: back to its input
                out = F.interpolate(out, size=view_in, mode="bilinear", align_corners=False)
            inv = v.invert_mask(out, (th, tw))
            for j in range(take):
                r = off + j
                img, (top, left) = r // n_tiles, origins[r % n_tiles]
                if weight is None:
                    acc[img] = inv[j]
                else:
                    acc[img, :, top : top + th, left : left + tw] += inv[j] * weight
                    wsum[img, :, top : top + th, left : left + tw] += weight  # type: ignore[index]
            seconds[v.name] += time.perf_counter() - t0
            off += take
        maps = acc / wsum if wsum is not None else acc
        p.arrays[v.name][first:hi] = _to_store(maps, plan, m.activation, dtype)
    _record(p, hi, seconds, recomputed, sizes, lo)


def _to_store(maps: Tensor, plan: Plan, activation: str, dtype: str) -> np.ndarray:
    """Stitched logits -> what the cache holds (reduced resolution, float16 or uint8 probs)."""
    store = stored_size(plan, tuple(maps.shape[-2:]))
    if store != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps, size=store, mode="area")
    if dtype == "uint8":
        probs = torch.softmax(maps, 1) if activation == "softmax" else torch.sigmoid(maps) if activation == "sigmoid" else maps.clamp(0, 1)
        return (probs * 255.0).round_().to(torch.uint8).cpu().numpy()
    if dtype == "float16":
        maps = maps.clamp(-65504, 65504)
    return maps.cpu().numpy()


# ---- detection -----------------------------------------------------------------------------


def detect_step(p: _Pending, canvas: Tensor, sizes: Tensor, lo: int, hi: int, device: torch.device, plan: Plan) -> None:
    """Views -> forward -> adapter boxes (view pixels) -> normalized -> inverted -> stored."""
    pre = p.member.preprocess
    runner = p.runner
    assert runner is not None
    x = _normalize(canvas, pre.mean, pre.std, device)
    size = tuple(x.shape[-2:])
    seconds: dict[str, float] = defaultdict(float)
    recomputed: dict[str, int] = defaultdict(int)
    for v in p.views:
        first = max(lo, p.start[v.name])
        if first >= hi:
            continue
        xv = v.apply(x[first - lo :])
        vh, vw = xv.shape[-2:]
        scale = np.array([vw, vh, vw, vh], dtype=np.float64)
        rows: list[np.ndarray] = []
        off = 0
        while off < xv.shape[0]:
            take = min(runner.sizer.current, xv.shape[0] - off)
            t0 = time.perf_counter()
            for boxes, scores, labels in runner(xv[off : off + take]):
                b = v.invert_boxes(np.clip(boxes / scale, 0.0, 1.0), size)
                rows.append(np.column_stack([b, scores, labels]).astype(np.float32))
            recomputed[v.name] += runner.last_recomputed
            seconds[v.name] += time.perf_counter() - t0
            off += take
        p.arrays[v.name].write(first, rows)
    _record(p, hi, seconds, recomputed, sizes, lo)


STEPS = {"classification": classify_step, "segmentation": segment_step, "detection": detect_step}
