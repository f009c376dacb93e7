"""Segmentation's forward side: a batch's canvases cut into tiles (:class:`Tiles`), and one
view's maps computed on them (:func:`view_maps`): forwarded, resized to the view's input,
inverted and stitched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kaggle_tta.config.errors import CheckpointError
from kaggle_tta.tasks.tiling import tile_origins, tile_weight

if TYPE_CHECKING:
    from torch import Tensor

    from kaggle_tta.engine.plan import Plan
    from kaggle_tta.exec.forward import MemberWork, ViewLog, ViewRows
    from kaggle_tta.io.data import Batch


def view_maps(work: MemberWork, job: ViewRows, tiles: Tiles, lo: int, hi: int, plan: Plan, log: ViewLog) -> Tensor:
    """One view's maps of the rows ``job`` names: its tiles forwarded, each output resized to
    the view's input, inverted and stitched (weighted where tiles overlap)."""
    import torch

    from kaggle_tta.exec.forward import Piece, run_chunks

    m, runner, v, device = work.member, work.runner, job.view, tiles.x.device
    assert runner is not None
    k, n_tiles, (th, tw) = m.out_channels, len(tiles.origins), tiles.size
    acc = torch.zeros((job.count, k, *tiles.canvas), device=device)
    wsum = torch.zeros((job.count, 1, *tiles.canvas), device=device) if tiles.weight is not None else None
    xv = tiles.rows[(job.first - lo) * n_tiles :]
    if job.sent is not None:  # the tiles of the images sent on (image-major rows)
        xv = (
            xv.unflatten(0, (hi - job.first, n_tiles))
            .index_select(0, torch.from_numpy(job.sent).to(device, non_blocking=True))
            .flatten(0, 1)
        )
    view_in = tuple(v.out_size((th, tw)))

    weight = tiles.weight

    def stitch(out: Tensor, slots: list) -> None:
        out = checked_output(out, m, k, plan, view_in)
        inv = v.invert_mask(out, (th, tw))
        _, off, take, _ = slots[0]
        for j in range(take):
            img, (top, left) = (off + j) // n_tiles, tiles.origins[(off + j) % n_tiles]
            if wsum is None or weight is None:
                acc[img] = inv[j]
            else:
                acc[img, :, top : top + th, left : left + tw] += inv[j] * weight
                wsum[img, :, top : top + th, left : left + tw] += weight

    run_chunks(runner, [Piece(v.name, xv.shape[0], lambda a, b: v.apply(xv[a:b]))], stitch, log)
    return acc / wsum if wsum is not None else acc


def normalize_canvas(batch: Batch, m: Any, device: Any) -> Tensor:
    """The member's canvas of the batch, normalized, on the device."""
    from kaggle_tta.exec.forward import normalize

    return normalize(batch.canvases[m.canvas.key], m.preprocess.mean, m.preprocess.std, device)


@dataclass
class Tiles:
    """A batch's canvases cut into the member's tiles (one tile, the canvas, without tiling):
    ``rows`` [B * T, C, th, tw], image-major (row r is image r // T, tile r % T)."""

    x: Tensor
    rows: Tensor
    origins: list[tuple[int, int]]
    size: tuple[int, int]
    canvas: tuple[int, int]
    weight: Tensor | None

    @classmethod
    def of(cls, x: Tensor, tiling: Any, device: Any) -> Tiles:
        import torch

        size = (int(x.shape[-2]), int(x.shape[-1]))
        origins = tile_origins(size, tiling.size, tiling.overlap) if tiling else [(0, 0)]
        th, tw = (min(tiling.size[0], size[0]), min(tiling.size[1], size[1])) if tiling else size
        many = len(origins) > 1
        weight = torch.from_numpy(tile_weight((th, tw), tiling.weight, tiling.sigma)).to(device) if many else None
        rows = (
            torch.stack([x[:, :, top : top + th, left : left + tw] for top, left in origins], 1).flatten(0, 1)
            if many
            else x
        )
        return cls(x, rows, origins, (th, tw), size, weight)


def checked_output(out: Tensor, m: Any, k: int, plan: Plan, view_in: tuple) -> Tensor:
    """The model's maps as [N, k, h, w] at the view's input size (a model predicting at a
    stride is resized back); any other shape is the member's error."""
    import torch.nn.functional as F

    if out.dim() != 4 or out.shape[1] != k:
        raise CheckpointError(
            f"members.{m.name}: the model outputs shape {tuple(out.shape)}, expected [N, {k}, h, w] "
            f"({'background + ' if k > len(plan.classes) else ''}one channel per class in data.classes, "
            f"activation {m.activation})"
        )
    if tuple(out.shape[-2:]) != view_in:  # a model predicting at a stride: back to its input
        out = F.interpolate(out, size=view_in, mode="bilinear", align_corners=False)
    return out
