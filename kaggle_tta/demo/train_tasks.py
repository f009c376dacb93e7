"""Trains the demo segmentation or detection model and saves it as fp16 safetensors.

    python -m kaggle_tta.demo.train_tasks segmentation --out kaggle_tta/demo/weights/seg_unet.safetensors
    python -m kaggle_tta.demo.train_tasks detection --out kaggle_tta/demo/weights/det_centernet.safetensors

Training scenes come from ``make_split(n_train, seed=1000)``, validation from
``make_split(300, seed=2000)`` (the demo test set uses seed 1: no overlap). Inputs are
ImageNet-normalized. Augmentation is horizontal flips only, so the models stay imperfectly
rotation-invariant and test-time D4 averaging has something to give. Seeds are fixed; a
rerun gives the same weights on the same machine. After saving, the file is reloaded into a
fresh model and evaluated again, so a broken checkpoint fails loudly here.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kaggle_tta.demo.generate import CLASSES, Scene, make_split
from kaggle_tta.demo.models import STRIDE, decode_centernet, tiny_centernet, tiny_unet

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
K = len(CLASSES)


def _images(scenes) -> torch.Tensor:
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _predict(model: torch.nn.Module, x: torch.Tensor, bs: int = 100) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    with torch.inference_mode():
        return torch.cat([model(x[i : i + bs].to(dev)).cpu() for i in range(0, len(x), bs)])


# --- segmentation -----------------------------------------------------------------------


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the foreground classes: CE alone underweights the small distractors."""
    p = logits.softmax(1)[:, 1:]
    t = F.one_hot(target, K + 1).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (p * t).sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1)).mean()


def seg_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean foreground Dice (per class over the whole set, classes present) and pixel accuracy."""
    dices = []
    for c in range(1, K + 1):
        p, t = pred == c, target == c
        if t.any():
            dices.append(2 * int((p & t).sum()) / int(p.sum() + t.sum()))
    return float(np.mean(dices)), float((pred == target).float().mean())


# --- detection --------------------------------------------------------------------------


def centernet_targets(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian heatmaps [K, h, w], regression targets [4, h, w] and centre mask [h, w].

    Regression targets are log width, log height (input pixels) and the centre's offset
    within its cell (0..1), set only at each object's centre cell.
    """
    h, w = math.ceil(size[0] / STRIDE), math.ceil(size[1] / STRIDE)
    heat = np.zeros((K, h, w), np.float32)
    reg = np.zeros((4, h, w), np.float32)
    mask = np.zeros((h, w), np.float32)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    for (x1, y1, x2, y2), c in zip(boxes, labels):
        bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        cx, cy = (x1 + x2) / 2 / STRIDE, (y1 + y2) / 2 / STRIDE
        ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
        # Elliptical Gaussian sized to the box (TTFNet's alpha = 0.54), at least half a cell.
        sx, sy = max(0.54 * bw / STRIDE / 6, 0.5), max(0.54 * bh / STRIDE / 6, 0.5)
        g = np.exp(-((gx - ix) ** 2) / (2 * sx**2) - (gy - iy) ** 2 / (2 * sy**2))
        heat[c] = np.maximum(heat[c], g)
        reg[:, iy, ix] = (math.log(bw), math.log(bh), cx - ix, cy - iy)
        mask[iy, ix] = 1.0
    return heat, reg, mask


def _det_targets(scenes, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heats, regs, masks = [], [], []
    for s in scenes:
        size = s.image.shape[:2]
        boxes = s.boxes.copy()
        if flip:  # mirror x: x1' = W - x2, x2' = W - x1
            boxes[:, [0, 2]] = size[1] - s.boxes[:, [2, 0]]
        hm, rg, mk = centernet_targets(boxes, s.box_labels, size)
        heats.append(hm)
        regs.append(rg)
        masks.append(mk)
    return torch.from_numpy(np.stack(heats)), torch.from_numpy(np.stack(regs)), torch.from_numpy(np.stack(masks))


def centernet_loss(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on heatmaps plus L1 on size and offset at centres."""
    logits = out[:, :K]
    p = logits.sigmoid()
    pos = heat.eq(1).float()
    pos_loss = F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = F.logsigmoid(-logits) * p**2 * (1 - heat) ** 4 * (1 - pos)
    n = mask.sum().clamp(min=1)
    focal = -(pos_loss.sum() + neg_loss.sum()) / n
    r = out[:, K:]
    pred = torch.cat([r[:, :2], r[:, 2:].sigmoid()], 1)
    l1 = ((pred - reg).abs() * mask.unsqueeze(1)).sum() / n
    return focal + l1


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter + 1e-9)


def voc_map(dets, gts, iou_thr: float = 0.5) -> float:
    """VOC all-point AP per class, averaged over classes that have ground truth.

    Args:
        dets: Per image ``(boxes [n, 4], scores [n], labels [n])``.
        gts: Per image ``(boxes [m, 4], labels [m])``.
    """
    aps = []
    for c in range(K):
        gt_c = [g[0][g[1] == c] for g in gts]
        n_gt = sum(len(g) for g in gt_c)
        if n_gt == 0:
            continue
        cand = [(float(s), i, b) for i, (bs, ss, ls) in enumerate(dets) for b, s, lab in zip(bs, ss, ls) if lab == c]
        cand.sort(key=lambda t: -t[0])
        used = [np.zeros(len(g), bool) for g in gt_c]
        tp = np.zeros(len(cand))
        for j, (_, i, b) in enumerate(cand):
            if len(gt_c[i]):
                ious = _iou(b, gt_c[i])
                best = int(ious.argmax())
                if ious[best] >= iou_thr and not used[i][best]:
                    used[i][best] = True
                    tp[j] = 1
        ctp = np.cumsum(tp)
        rec = np.concatenate([[0.0], ctp / n_gt, [1.0]])
        prec = np.concatenate([[0.0], ctp / np.maximum(np.arange(1, len(cand) + 1), 1), [0.0]])
        prec = np.maximum.accumulate(prec[::-1])[::-1]  # precision envelope
        step = np.nonzero(rec[1:] != rec[:-1])[0]
        aps.append(float(np.sum((rec[step + 1] - rec[step]) * prec[step + 1])))
    return float(np.mean(aps))


def det_metric(model: torch.nn.Module, x: torch.Tensor, scenes) -> float:
    dets = decode_centernet(_predict(model, x), (int(x.shape[-2]), int(x.shape[-1])))
    return voc_map(dets, [(s.boxes, s.box_labels) for s in scenes])


# --- training ---------------------------------------------------------------------------

# Tuned for ~3 minutes on 2 CPU threads (about 6 ms per 64x64 image, forward and backward,
# whatever the batch). Optimizer steps, not epochs, were what limited quality, hence the
# small batch; detection takes a higher peak learning rate.
BATCH = 16
EPOCHS = 8
LR = {"segmentation": 3e-3, "detection": 6e-3}


@dataclass
class Objective:
    """What a task trains on and is judged by: ``loss(output, batch indices, flipped)`` (the
    batch's images mirrored where ``flipped``) and ``evaluate(model) -> (metric, text)``."""

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], tuple[float, str]]


def segmentation_objective(scenes: Sequence[Scene], val: Sequence[Scene], xv: torch.Tensor) -> Objective:
    """Cross-entropy plus soft Dice on the masks; validation foreground Dice."""
    y = torch.from_numpy(np.stack([s.mask for s in scenes])).long()
    yv = torch.from_numpy(np.stack([s.mask for s in val])).long()
    targets = (y, y.flip(-1))  # flipped copy lines up with the flipped images

    def loss_fn(o: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        t = torch.where(flip.view(-1, 1, 1), targets[1][idx], targets[0][idx])
        t = t.to(o.device)
        return F.cross_entropy(o, t) + _dice_loss(o, t)

    def evaluate(m: torch.nn.Module) -> tuple[float, str]:
        dice, acc = seg_metrics(_predict(m, xv).argmax(1), yv)
        return dice, f"val foreground Dice {dice:.3f}, pixel accuracy {acc:.4f}"

    return Objective(loss_fn, evaluate)


def detection_objective(scenes: Sequence[Scene], val: Sequence[Scene], xv: torch.Tensor) -> Objective:
    """CenterNet's loss on heatmaps, sizes and offsets; validation mAP@0.5."""
    # Flipping targets is not a flip of the target maps (cells are floor-based), so
    # both versions are built from mirrored boxes up front.
    targets = (_det_targets(scenes, False), _det_targets(scenes, True))

    def loss_fn(o: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        ts = [torch.where(flip.view(-1, *[1] * (a.dim() - 1)), b[idx], a[idx]).to(o.device) for a, b in zip(*targets)]
        return centernet_loss(o, *ts)

    def evaluate(m: torch.nn.Module) -> tuple[float, str]:
        ap = det_metric(m, xv, val)
        return ap, f"val mAP@0.5 {ap:.3f}"

    return Objective(loss_fn, evaluate)


def train(
    task: str,
    n_train: int = 3000,
    epochs: int = EPOCHS,
    seed: int = 0,
    out: Path | None = None,
    device: str = "cpu",
    lr: float | None = None,
) -> float:
    """Trains one demo model; saves it to ``out`` (if given) and checks the reload.

    Returns:
        The validation metric: mean foreground Dice or mAP@0.5.
    """
    lr = lr or LR[task]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    scenes, val = make_split(n_train, seed=1000), make_split(300, seed=2000)
    x, xv = _images(scenes), _images(val)
    build = tiny_unet if task == "segmentation" else tiny_centernet
    model = build(num_classes=K).to(device)
    objective = (segmentation_objective if task == "segmentation" else detection_objective)(scenes, val, xv)
    fit(model, x, objective.loss, epochs, lr, seed, device, t0)
    metric, text = objective.evaluate(model)
    print(f"{task}: {text} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if out is not None:
        save_and_check(model, build, out, objective.evaluate, t0)
    return metric


def fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    seed: int,
    device: str,
    t0: float,
) -> None:
    """AdamW with a one-cycle schedule over ``epochs`` of ``x`` in batches of BATCH, each
    image flipped horizontally at random (seeded); prints each epoch's mean loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.02)
    bs = BATCH
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), x[idx].flip(-1), x[idx])
            loss = loss_fn(model(xb.to(device)), idx, flip)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)


def save_and_check(
    model: torch.nn.Module,
    build: Callable[..., torch.nn.Module],
    out: Path,
    evaluate: Callable[[torch.nn.Module], tuple[float, str]],
    t0: float,
) -> None:
    """Saves the weights as fp16 safetensors, then reloads them into a fresh model and
    evaluates it again, so that a broken checkpoint fails loudly here."""
    from safetensors.torch import load_file, save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            n: p.detach().half().contiguous() if p.is_floating_point() else p.contiguous()
            for n, p in model.state_dict().items()
        },
        str(out),
    )
    fresh = build(num_classes=K)
    fresh.load_state_dict(load_file(str(out)), strict=True)
    print(f"reloaded from fp16: {evaluate(fresh)[1]}")
    print(f"{time.perf_counter() - t0:.0f}s -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["segmentation", "detection"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train(args.task, args.n_train, args.epochs, args.seed, args.out, args.device)


if __name__ == "__main__":
    main()
