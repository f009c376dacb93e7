"""Trains the demo members on freshly generated scenes and saves them as fp16 safetensors.

    python -m kaggle_tta.demo.train pipeline.yaml        # what `make demo-weights` runs

Every member of the pipeline whose checkpoint lies under kaggle_tta/demo/weights is trained
with its own resolved preprocessing (input size, crop, mean, std), so training and inference
see the same inputs. Training augments with random crops and horizontal flips only: the
members stay imperfectly rotation-invariant, which is what TTA over D4 is for. Seeds are
fixed; a rerun gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kaggle_tta.config import load_classes, load_pipeline
from kaggle_tta.demo.generate import make_split
from kaggle_tta.io.models import resolve_preprocess

WEIGHTS_DIR = Path(__file__).parent / "weights"


def _tensors(scenes, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor([s.label for s in scenes])
    return x, y


def _center(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    top, left = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def train_member(
    arch: str,
    n_classes: int,
    pre,
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    epochs: int,
    seed: int,
) -> tuple[torch.nn.Module, float]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.02)
    bs = 64
    steps = epochs * math.ceil(len(x) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    h, w = pre.size
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            top = int(torch.randint(0, x.shape[-2] - h + 1, (1,), generator=g))
            left = int(torch.randint(0, x.shape[-1] - w + 1, (1,), generator=g))
            xb = x[idx, :, top : top + h, left : left + w]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.inference_mode():
        acc = float((model(_center(xv, pre.size)).argmax(1) == yv).float().mean())
    return model, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", nargs="?", default="pipeline.yaml")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_pipeline(args.pipeline)
    classes = load_classes(cfg)
    train = make_split(args.n_train, seed=1000)
    val = make_split(500, seed=2000)  # the demo test set uses seed 1: no overlap
    for k, m in enumerate(cfg.members):
        ckpt = cfg.resolve(m.checkpoint) if m.checkpoint else None
        if ckpt is None or WEIGHTS_DIR.resolve() not in ckpt.resolve().parents or not m.arch:
            continue
        pre = resolve_preprocess(cfg, m)
        x, y = _tensors(train, pre.mean, pre.std)
        xv, yv = _tensors(val, pre.mean, pre.std)
        t = time.perf_counter()
        model, acc = train_member(m.arch, len(classes), pre, x, y, xv, yv, args.epochs, seed=k)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                n: p.detach().half().contiguous() if p.is_floating_point() else p.contiguous()
                for n, p in model.state_dict().items()
            },
            str(ckpt),
        )
        print(
            f"{m.name} ({m.arch}): val accuracy {acc:.3f}, {time.perf_counter() - t:.0f}s -> {ckpt} "
            f"({ckpt.stat().st_size / 1e6:.2f} MB)"
        )


if __name__ == "__main__":
    main()
