"""Segmentation at each image's own size (``segmentation.size: native``).

Forward: an image is read window by window (kaggle_tta.io.windows: a TIFF's tiles from disk)
one row of tiles at a time; each view's maps are inverted, scaled to the cache's resolution
(``cache.scale``) and stitched into a band of rows that is written out as soon as no later
tile can reach it. Memory is a row of tiles and one band per view, whatever the image's size.
The cache keeps the dense ``[N, K, h, w]`` layout of every segmentation view, ``h, w`` the
largest stored image: image i fills the top-left ``round(H_i * scale) x round(W_i * scale)``
of its row; the rest is never written (a hole in the file, no disk used).

Writing: each image's RLE is made band by band — its probabilities resized (bilinear, as
cv2.resize) to the image one band of columns (column order) or rows (row order) at a time,
thresholded, and run-length encoded with runs joined across bands — so an image of 50 000 x
50 000 pixels is never whole in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kaggle_tta.config.errors import ConfigError
from kaggle_tta.io.windows import WindowSource
from kaggle_tta.ops.rle import RunWriter
from kaggle_tta.tasks.seg_forward import checked_output
from kaggle_tta.tasks.tiling import tile_origins, tile_weight

if TYPE_CHECKING:
    from torch import Tensor

    from kaggle_tta.config import PipelineConfig, SubmissionConfig
    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.forward import MemberWork, ViewLog
    from kaggle_tta.io.data import Batch

BAND = 256  # at most this many columns (or rows) of an image resized and encoded at a time
BAND_BYTES = 32 << 20  # ... fewer where the band's float32 probabilities would pass this (tall images)
TILE_BYTES = 24 << 20  # a group of tiles read and forwarded together: at most this much float32 input


def native(cfg: PipelineConfig) -> bool:
    return cfg.segmentation.size == "native"


def check_native(plan: Plan) -> None:
    """What native size cannot do, refused at load with the fix."""
    seg = plan.cfg.segmentation
    areas = seg.min_area if isinstance(seg.min_area, list) else [seg.min_area]
    if any(a > 0 for a in areas):
        raise ConfigError(
            "segmentation.min_area: components are not removed at native size (it would need each whole mask "
            "in memory); set 0, or give segmentation.size: [H, W]"
        )
    for m in plan.members:
        if m.gate is not None:
            raise ConfigError(
                f"members.{m.name}.adaptive: adaptive views are not run at native size; remove it, or give "
                "segmentation.size: [H, W]"
            )


def stored_of(scale: float, size: tuple[int, int]) -> tuple[int, int]:
    """The cached map's (h, w) of an image of ``size``."""
    if scale == 1.0:
        return int(size[0]), int(size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def native_step(work: MemberWork, batch: Batch, plan: Plan) -> None:
    """Each image of the batch, read window by window, through every pending view."""
    from kaggle_tta.exec.forward import ViewLog
    from kaggle_tta.io.readers import reader_of

    log = ViewLog()
    reader = reader_of(plan.cfg)
    tile = work.member.cfg.tiling.size if work.member.cfg.tiling else None
    for part in work.view_rows(batch.lo, batch.hi):
        jobs = [j for j in part if j.count]
        whole: dict[tuple, list[int]] = {}  # images that are one tile, by size and views: forwarded together
        for i in range(batch.lo, batch.hi):
            views = [j.view for j in jobs if j.first <= i]
            h, w = (int(v) for v in batch.sizes[i - batch.lo])
            if views and (tile is None or (h <= tile[0] and w <= tile[1])):
                whole.setdefault(((h, w), tuple(v.name for v in views)), []).append(i)
            elif views:
                with WindowSource(str(plan.testset.paths[i]), reader) as src:
                    _image(work, i, src, views, plan, log)
        for (size, names), rows in whole.items():
            _whole_images(work, rows, size, [j.view for j in jobs if j.view.name in names], plan, log)
    work.record(batch.lo, batch.hi, batch.sizes, log)


def _whole_images(
    work: MemberWork, rows: list[int], size: tuple[int, int], views: list, plan: Plan, log: ViewLog
) -> None:
    """Images of one size that are one tile each, read whole and forwarded together (a batch
    of UW-Madison's slices, not one forward per slice)."""
    import torch
    import torch.nn.functional as F

    from kaggle_tta.exec.forward import normalize
    from kaggle_tta.io.readers import reader_of

    m, runner, reader = work.member, work.runner, reader_of(plan.cfg)
    assert runner is not None
    pixels = []
    for i in rows:
        with WindowSource(str(plan.testset.paths[i]), reader) as src:
            pixels.append(src.read(0, 0, *size))
    x = normalize(torch.from_numpy(np.stack(pixels)), m.preprocess.mean, m.preprocess.std, runner.device)
    stored = stored_of(plan.cfg.cache.scale, size)
    for v in views:
        maps = _view_tiles(work, v, x, plan, log)
        if tuple(stored) != tuple(size):  # to the cache's resolution, as a band scales its one tile
            maps = F.interpolate(maps, size=stored, mode="area")
        for k, i in enumerate(rows):
            work.store[v.name][i, :, : stored[0], : stored[1]] = stored_values(
                maps[k], m.activation, plan.cfg.cache.dtype
            )


def _image(work: MemberWork, i: int, src: WindowSource, views: list, plan: Plan, log: ViewLog) -> None:
    """One image: rows of tiles read, forwarded through ``views``, stitched band by band."""
    import torch

    from kaggle_tta.exec.forward import normalize

    m, runner = work.member, work.runner
    assert runner is not None
    size = src.size
    tiling = m.cfg.tiling
    origins = tile_origins(size, tiling.size, tiling.overlap) if tiling else [(0, 0)]
    th, tw = (min(tiling.size[0], size[0]), min(tiling.size[1], size[1])) if tiling else size
    weight = (
        torch.from_numpy(tile_weight((th, tw), tiling.weight, tiling.sigma)).to(runner.device)
        if tiling and len(origins) > 1
        else None
    )
    stored = stored_of(plan.cfg.cache.scale, size)
    bands = {v.name: _Band(m.out_channels, stored, size, (th, tw), runner.device) for v in views}
    tops = sorted({t for t, _ in origins})
    group = max(1, min(runner.sizer.current, TILE_BYTES // max(1, th * tw * 4 * max(3, m.out_channels))))
    for r, top in enumerate(tops):
        lefts = [left for t, left in origins if t == top]
        for g in range(0, len(lefts), group):  # a few tiles at a time: memory bounded by the tile
            part = lefts[g : g + group]
            x = torch.from_numpy(np.stack([src.read(top, left, th, tw) for left in part]))
            x = normalize(x, m.preprocess.mean, m.preprocess.std, runner.device)
            for v in views:
                maps = _view_tiles(work, v, x, plan, log)
                for k, left in enumerate(part):
                    bands[v.name].add(maps[k], (top, left), weight)
        for v in views:
            done = tops[r + 1] if r + 1 < len(tops) else size[0]
            rows, values = bands[v.name].take(done)
            if values is not None:
                store = work.store[v.name]
                store[i, :, rows[0] : rows[1], : stored[1]] = stored_values(values, m.activation, plan.cfg.cache.dtype)


def _view_tiles(work: MemberWork, v: Any, x: Tensor, plan: Plan, log: ViewLog) -> Tensor:
    """One view's inverted maps of tiles ``x`` ``[T, C, th, tw]`` -> ``[T, K, th, tw]``."""
    import torch

    from kaggle_tta.exec.forward import Piece, run_chunks

    runner, th, tw = work.runner, int(x.shape[-2]), int(x.shape[-1])
    assert runner is not None
    out = torch.empty((x.shape[0], work.member.out_channels, th, tw), device=x.device)
    view_in = tuple(v.out_size((th, tw)))

    def put(y: Tensor, slots: list) -> None:
        y = checked_output(y, work.member, work.member.out_channels, plan, view_in)
        _, off, take, _ = slots[0]
        out[off : off + take] = v.invert_mask(y, (th, tw))

    run_chunks(runner, [Piece(v.name, x.shape[0], lambda a, b: v.apply(x[a:b]))], put, log)
    return out


class _Band:
    """The rows of a view's stitched map still open to tiles, at the cache's resolution."""

    def __init__(self, k: int, stored: tuple[int, int], size: tuple[int, int], tile: tuple[int, int], device: Any):
        import torch

        self.sy, self.sx = stored[0] / size[0], stored[1] / size[1]
        self.stored, self.size = stored, size
        height = min(stored[0], int(np.ceil(tile[0] * self.sy)) + 2)
        self.acc = torch.zeros((k, height, stored[1]), device=device)
        self.wsum = torch.zeros((1, height, stored[1]), device=device)
        self.top = 0  # the stored row that acc[:, 0] is

    def _span(self, start: int, length: int, s: float, limit: int) -> tuple[int, int]:
        return round(start * s), min(limit, round((start + length) * s))

    def add(self, tile: Tensor, at: tuple[int, int], weight: Tensor | None) -> None:
        import torch.nn.functional as F

        y0, y1 = self._span(at[0], tile.shape[-2], self.sy, self.stored[0])
        x0, x1 = self._span(at[1], tile.shape[-1], self.sx, self.stored[1])
        w = weight if weight is not None else tile.new_ones(tile.shape[-2:])
        if (y1 - y0, x1 - x0) != tuple(tile.shape[-2:]):  # to the cache's resolution
            tile = F.interpolate(tile[None], size=(y1 - y0, x1 - x0), mode="area")[0]
            w = F.interpolate(w[None, None], size=(y1 - y0, x1 - x0), mode="area")[0, 0]
        self.acc[:, y0 - self.top : y1 - self.top, x0:x1] += tile * w
        self.wsum[:, y0 - self.top : y1 - self.top, x0:x1] += w

    def take(self, done: int) -> tuple[tuple[int, int], Tensor | None]:
        """The stored rows no tile starting at image row ``done`` or later can reach,
        normalized by their weights, and the band moved down past them."""
        import torch

        end = self.stored[0] if done >= self.size[0] else round(done * self.sy)
        n = end - self.top
        if n <= 0:
            return (self.top, self.top), None
        values = self.acc[:, :n] / self.wsum[:, :n]
        rows = (self.top, end)
        self.acc = torch.cat([self.acc[:, n:], torch.zeros_like(self.acc[:, :n])], 1)
        self.wsum = torch.cat([self.wsum[:, n:], torch.zeros_like(self.wsum[:, :n])], 1)
        self.top = end
        return rows, values


def stored_values(maps: Tensor, activation: str, dtype: str, axis: int = 0) -> np.ndarray:
    """Logits ``[K, h, w]`` (channels on ``axis``) as the cache holds them (uint8
    probabilities, float16, float32)."""
    import torch

    if dtype == "uint8":
        probs = (
            torch.softmax(maps, axis)
            if activation == "softmax"
            else torch.sigmoid(maps)
            if activation == "sigmoid"
            else maps.clamp(0, 1)
        )
        return (probs * 255.0).round_().to(torch.uint8).cpu().numpy()
    if dtype == "float16":
        maps = maps.clamp(-65504, 65504)
    return maps.cpu().numpy()


# ---- writing -------------------------------------------------------------------------------


def native_rows(
    image_id: str,
    read: Callable[[int, int], np.ndarray],
    stored: tuple[int, int],
    size: tuple[int, int],
    decide: Callable[[np.ndarray], np.ndarray],
    classes: Sequence[str],
    spec: SubmissionConfig,
    row_id: Any,
    channels: int = 1,
) -> list[tuple[str, str]]:
    """One image's RLE rows, band by band (``channels``, the maps' K', sizes the bands):
    ``read(a, b)`` gives its stored probabilities
    ``[K', h, w]`` of stored columns (column order) or rows (row order) ``a:b`` only, and
    ``decide`` turns ``[.., .., K']`` probabilities into ``[K, .., ..]`` masks."""
    r = spec.rle
    column = r.order == "column"
    H, W = int(size[0]), int(size[1])
    per_class = r.rows != "image"
    writers = [RunWriter(r.one_indexed) for _ in (classes if per_class else [0])]
    across = H if column else W  # a band's other side: its memory grows with it, so bands narrow
    band = max(8, min(BAND, BAND_BYTES // max(1, across * channels * 4 * 6)))  # ~6 float32 copies in flight
    for a in range(0, W if column else H, band):
        b = min(a + band, W if column else H)
        masks = decide(band_probs(read, stored, (H, W), (a, b), column))
        for k, w in enumerate(writers):
            mk = masks[k] if per_class else masks.any(axis=0)
            w.add(mk.ravel(order="F" if column else "C"))
    if per_class:
        return [(row_id(image_id, k, name), w.text(r.empty)) for k, (w, name) in enumerate(zip(writers, classes))]
    return [(image_id, writers[0].text(r.empty))]


def band_probs(
    read: Callable[[int, int], np.ndarray],
    stored: tuple[int, int],
    size: tuple[int, int],
    span: tuple[int, int],
    column: bool,
) -> np.ndarray:
    """Columns (or rows) ``span`` of the image's probabilities, resized bilinearly from the
    stored ``[K', h, w]`` (cv2.resize's INTER_LINEAR: half-pixel centres, edges repeated) ->
    ``[H, b - a, K']`` (or ``[b - a, W, K']``), reading only the stored band they need."""
    (h, w), (H, W) = stored, size
    ys = np.arange(H) if column else np.arange(span[0], span[1])
    xs = np.arange(span[0], span[1]) if column else np.arange(W)
    if (h, w) == (H, W):
        return np.ascontiguousarray(np.moveaxis(read(span[0], span[1]), 0, -1), dtype=np.float32)
    y0, y1, wy = _axis(ys, h / H, h)
    x0, x1, wx = _axis(xs, w / W, w)
    if column:
        first, last = int(x0.min()), int(x1.max()) + 1
        x0, x1 = x0 - first, x1 - first
    else:
        first, last = int(y0.min()), int(y1.max()) + 1
        y0, y1 = y0 - first, y1 - first
    q = np.moveaxis(read(first, last), 0, -1).astype(np.float32, copy=False)
    across = q[:, x0] * (1 - wx)[None, :, None] + q[:, x1] * wx[None, :, None]  # [rows, band, K']
    if column:  # down the whole height: OpenCV's vertical pass (the same sampling, 4-6x faster)
        import cv2

        flat = np.ascontiguousarray(across.reshape(h, -1), dtype=np.float32)
        return cv2.resize(flat, (flat.shape[1], H), interpolation=cv2.INTER_LINEAR).reshape(H, *across.shape[1:])
    return (across[y0] * (1 - wy)[:, None, None] + across[y1] * wy[:, None, None]).astype(np.float32)


def _axis(out: np.ndarray, scale: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (out + 0.5) * scale - 0.5
    lo = np.floor(src)
    frac = (src - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    frac[lo < 0] = 0.0
    lo = np.clip(lo, 0, n - 1)
    frac[lo >= n - 1] = 0.0
    return lo, np.minimum(lo + 1, n - 1), frac
