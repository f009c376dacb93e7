"""Small segmentation and detection models for the embedded demo, built from timm.

Both models take normalized float images ``[B, 3, H, W]`` of any height and width: they
pad on the bottom and right to a multiple of the encoder stride and crop back, so pixel
and cell coordinates never shift. Only the first three encoder stages are used (strides 2,
4 and 8): on the 64x64 demo scenes a fourth stage gave no better Dice or mAP and would
nearly quadruple the checkpoint (about 0.7 MB in fp16 as is).

    tiny_unet        -> logits [B, K + 1, H, W] (channel 0 background, k + 1 class k)
    tiny_centernet   -> raw map [B, K + 4, ceil(H / 4), ceil(W / 4)]
    decode_centernet -> per image (boxes xyxy, scores, labels) in input pixels
"""

from __future__ import annotations

import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE = 4  # CenterNet output stride, in input pixels per cell
_PAD_TO = 8  # deepest encoder stride used


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class _Pyramid(nn.Module):
    """timm encoder (strides 2, 4, 8) plus a top-down FPN decoder, down to stride ``finest``."""

    def __init__(self, encoder: str, width: int, finest: int):
        super().__init__()
        self.encoder = timm.create_model(encoder, pretrained=False, features_only=True, out_indices=(0, 1, 2))
        reductions = self.encoder.feature_info.reduction()
        if reductions != [2, 4, 8]:
            raise ValueError(f"encoder {encoder!r}: first three stages have strides {reductions}, need [2, 4, 8]")
        chans = self.encoder.feature_info.channels()
        keep = [i for i, r in enumerate(reductions) if r >= finest]
        self.keep = keep
        self.lateral = nn.ModuleList(nn.Conv2d(chans[i], width, 1) for i in keep)
        # One smoothing conv per merged level: cheap, and it removes upsampling artefacts.
        self.smooth = nn.ModuleList(_conv(width, width) for _ in keep[:-1])

    def forward(self, x: Tensor) -> Tensor:
        """Returns the finest fused feature map [B, width, H / finest, W / finest] of padded x."""
        feats = self.encoder(x)
        p = self.lateral[-1](feats[self.keep[-1]])
        for j in range(len(self.keep) - 2, -1, -1):
            f = self.lateral[j](feats[self.keep[j]])
            p = self.smooth[j](f + _up(p, f))
        return p


def _pad(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        # Bottom/right only keeps coordinates fixed; replicate works for any size, reflect does not.
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


class TinyUNet(nn.Module):
    """FPN-style U-Net: encoder skips at strides 8, 4 and 2, logits upsampled from stride 2."""

    def __init__(self, num_classes: int = 4, encoder: str = "resnet10t", width: int = 32):
        super().__init__()
        self.pyramid = _Pyramid(encoder, width, finest=2)
        # Logits at stride 2, then bilinear: a full-resolution decoder block doubled the
        # training cost on CPU for under one point of Dice on the demo scenes.
        self.classifier = nn.Conv2d(width, num_classes + 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Maps [B, 3, H, W] normalized images to logits [B, K + 1, H, W]."""
        h, w = x.shape[-2:]
        xp = _pad(x, _PAD_TO)
        y = _up(self.classifier(self.pyramid(xp)), xp)
        return y[..., :h, :w]


class TinyCenterNet(nn.Module):
    """CenterNet at stride 4: class heatmaps, log box size and sub-cell centre offset."""

    def __init__(self, num_classes: int = 4, encoder: str = "resnet10t", width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.pyramid = _Pyramid(encoder, width, finest=STRIDE)
        # Separate heads: classification and regression want different features.
        self.heatmap = nn.Sequential(_conv(width, width), nn.Conv2d(width, num_classes, 1))
        self.regress = nn.Sequential(_conv(width, width), nn.Conv2d(width, 4, 1))
        # Start heatmaps at p = 0.1 (CenterNet's prior) so the focal loss does not explode.
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - 0.1) / 0.1))

    def forward(self, x: Tensor) -> Tensor:
        """Maps [B, 3, H, W] normalized images to [B, K + 4, ceil(H / 4), ceil(W / 4)].

        Channels: ``[0, K)`` heatmap logits, ``K, K + 1`` log box width and height in input
        pixels, ``K + 2, K + 3`` centre offset x, y within the cell as logits (sigmoid gives
        0..1 cells).
        """
        h, w = x.shape[-2:]
        p = self.pyramid(_pad(x, _PAD_TO))
        y = torch.cat([self.heatmap(p), self.regress(p)], 1)
        return y[..., : math.ceil(h / STRIDE), : math.ceil(w / STRIDE)]


def tiny_unet(num_classes: int = 4, encoder: str = "resnet10t", width: int = 32) -> nn.Module:
    """Builds the demo segmentation model.

    Args:
        num_classes: Foreground classes K; the output has K + 1 channels.
        encoder: timm model name whose first three feature stages have strides 2, 4, 8.
        width: Decoder channels.

    Returns:
        A module mapping normalized ``[B, 3, H, W]`` (any H, W) to logits
        ``[B, K + 1, H, W]``: channel 0 background, channel k + 1 class k, softmax over
        channels.
    """
    return TinyUNet(num_classes, encoder, width)


def tiny_centernet(num_classes: int = 4, encoder: str = "resnet10t", width: int = 32) -> nn.Module:
    """Builds the demo CenterNet detector.

    Args:
        num_classes: Object classes K.
        encoder: timm model name whose first three feature stages have strides 2, 4, 8.
        width: Decoder and head channels.

    Returns:
        A module mapping normalized ``[B, 3, H, W]`` (any H, W) to one raw tensor
        ``[B, K + 4, ceil(H / 4), ceil(W / 4)]``; see ``decode_centernet``.
    """
    return TinyCenterNet(num_classes, encoder, width)


@torch.no_grad()
def decode_centernet(output: Tensor, input_size: tuple[int, int], max_boxes: int = 20, min_score: float = 0.05) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Turns raw ``tiny_centernet`` output into boxes.

    Args:
        output: ``[B, K + 4, h, w]`` as returned by the model, any float dtype.
        input_size: ``(H, W)`` of the tensor fed to the model; boxes are clipped to it.
        max_boxes: Most boxes kept per image, highest scores first.
        min_score: Peaks scoring below this are dropped.

    Returns:
        One ``(boxes, scores, labels)`` per image: float32 ``[n, 4]`` pixel x1, y1, x2, y2
        in the input's coordinates, float32 ``[n]`` in [0, 1], int64 ``[n]``.
    """
    out = output.detach().float()  # fp16 sigmoid/exp lose too much and may overflow
    b, c, h, w = out.shape
    k = c - 4
    heat = out[:, :k].sigmoid()
    # A cell is a peak if it is the maximum of its 3x3 neighbourhood: CenterNet's NMS.
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    n = min(max_boxes, k * h * w)
    scores, idx = heat.flatten(1).topk(n, dim=1)
    labels = idx // (h * w)
    cell = idx % (h * w)
    ys, xs = cell // w, cell % w
    reg = out[:, k:].flatten(2)  # [B, 4, h * w]
    reg = reg.gather(2, cell.unsqueeze(1).expand(-1, 4, -1))  # [B, 4, n]
    # Clamp log sizes: an untrained or fp16 map must not give inf boxes.
    size = reg[:, :2].clamp(-5, math.log(4 * max(input_size) + 1)).exp()
    cx = (xs + reg[:, 2].sigmoid()) * STRIDE
    cy = (ys + reg[:, 3].sigmoid()) * STRIDE
    H, W = input_size
    boxes = torch.stack([cx - size[:, 0] / 2, cy - size[:, 1] / 2, cx + size[:, 0] / 2, cy + size[:, 1] / 2], -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, W)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, H)
    results = []
    for i in range(b):
        keep = scores[i] >= min_score
        results.append(
            (
                boxes[i][keep].cpu().numpy().astype(np.float32).reshape(-1, 4),
                scores[i][keep].cpu().numpy().astype(np.float32),
                labels[i][keep].cpu().numpy().astype(np.int64),
            )
        )
    return results
