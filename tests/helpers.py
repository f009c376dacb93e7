"""Model factories used by the tests through `factory: helpers:...`."""

from __future__ import annotations

import torch
from torch import nn


class NanUnderAutocast(nn.Module):
    """Per-pixel-mean classifier that returns NaN whenever autocast is on (as an overflow
    in reduced precision would), and finite logits in fp32."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x.float().mean(dim=(2, 3)))
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            return torch.full_like(out, float("nan"))
        return out


class MeanColourClassifier(nn.Module):
    """Exactly invariant to every spatial view: logits from the per-channel image mean."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def nan_model(num_classes: int = 4) -> nn.Module:
    return NanUnderAutocast(num_classes)


def invariant_model(num_classes: int = 4) -> nn.Module:
    return MeanColourClassifier(num_classes)


class PerPixel(nn.Module):
    """A 1x1 convolution: exactly equivariant to every flip, rotation and transpose."""

    def __init__(self, out_channels: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class StridedPerPixel(PerPixel):
    """Per-pixel logits predicted at half resolution (as a stride-2 decoder would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True))


class BrightBoxes(nn.Module):
    """A deterministic detector: for each channel c, the box around the pixels brighter than
    a threshold is a detection of class c, scored by their mean brightness. Its boxes move
    exactly with the image, so TTA + fusion must give back the same boxes."""

    def __init__(self, threshold: float = 1.5):
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c = x.shape[:2]
        boxes = torch.zeros(b, c, 4)
        scores = torch.zeros(b, c)
        labels = torch.full((b, c), -1, dtype=torch.int64)
        for i in range(b):
            for k in range(c):
                on = x[i, k] > self.threshold
                if on.any():
                    ys, xs = torch.nonzero(on, as_tuple=True)
                    boxes[i, k] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                    scores[i, k] = torch.sigmoid(x[i, k][on].mean())
                    labels[i, k] = k
        return {"boxes": boxes, "scores": scores, "labels": labels}


def per_pixel(out_channels: int = 5) -> nn.Module:
    return PerPixel(out_channels)


def strided_per_pixel(out_channels: int = 5) -> nn.Module:
    return StridedPerPixel(out_channels)


def bright_boxes(threshold: float = 1.5) -> nn.Module:
    return BrightBoxes(threshold)


class BrightPixels(nn.Module):
    """Per-pixel segmentation of bright colour channels: background logit 0, class c logit
    8 * (x_c - 1) (channel c of the normalized image), a fourth class never present."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes + 1, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            for c in range(min(3, num_classes)):
                self.conv.weight[c + 1, c] = 8.0
                self.conv.bias[c + 1] = -8.0
            for c in range(4, num_classes + 1):
                self.conv.bias[c] = -20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def bright_pixels(num_classes: int = 4) -> nn.Module:
    return BrightPixels(num_classes)


class MeanBrightness(nn.Module):
    """A regressor of brightness: the mean of its input pixels over channels, rows and
    columns, ``[N, 1]``. Exactly invariant to flips (up to float summation order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


def mean_brightness() -> nn.Module:
    return MeanBrightness()


class LayoutReporter(nn.Module):
    """Logit 0 is 1.0 where the input came in channels_last, else 0.0 (the rest zero)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 3, 1)  # a 4-D weight: the runner may convert it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = float(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        out = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        out[:, 0] = flag
        return out + 0.0 * self.conv(x).mean()


def layout_reporter(num_classes: int = 4) -> nn.Module:
    return LayoutReporter(num_classes)


class TopLeftPixels(nn.Module):
    """Logits are the input's first pixels (channel 0, row 0): which pixels a view got."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 3, 1)  # a weight for the runner's layout handling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, : self.num_classes].float() + 0.0 * self.conv(x).mean()


def top_left_pixels(num_classes: int = 4) -> nn.Module:
    return TopLeftPixels(num_classes)


class NearlyTiedLogits(nn.Module):
    """Fragile in bf16: logits of about 1000 (as a real model's reach 936 on a scaled view)
    that differ between classes by about 1 (the per-channel image mean, weighted), so bf16's
    spacing of 4 there ties or flips the top class on most inputs, while the relative L2
    error stays ~1e-3. In fp32 the top class is well defined."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, generator=g) * 2.0)
            self.head.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class WellSeparatedLogits(nn.Module):
    """Robust in bf16: logits of order 1 whose top class leads by more than 1, so bf16's
    relative rounding (2^-9) neither flips it nor moves the logits by more than ~1e-3."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, 3, generator=g) * 0.3)
            self.head.bias.copy_(torch.tensor([2.0] + [0.0] * (num_classes - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def nearly_tied_model(num_classes: int = 4) -> nn.Module:
    return NearlyTiedLogits(num_classes)


def well_separated_model(num_classes: int = 4) -> nn.Module:
    return WellSeparatedLogits(num_classes)


class NearlyTiedPixels(nn.Module):
    """Segmentation fragile in bf16: per-pixel logits of about 1000 that differ between
    classes by about 1, so bf16 ties or flips the argmax of most pixels."""

    def __init__(self, out_channels: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(out_channels, 3, 1, 1, generator=g) * 2.0)
            self.conv.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def nearly_tied_pixels(out_channels: int = 5) -> nn.Module:
    return NearlyTiedPixels(out_channels)


class WellSeparatedPixels(nn.Module):
    """Segmentation robust in bf16: per-pixel logits of order 1 whose top class leads by more
    than 1 on inputs in [-3, 3]."""

    def __init__(self, out_channels: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(out_channels, 3, 1, 1, generator=g) * 0.1)
            self.conv.bias.copy_(torch.tensor([3.0] + [0.0] * (out_channels - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def well_separated_pixels(out_channels: int = 5) -> nn.Module:
    return WellSeparatedPixels(out_channels)


class ChannelMeans(nn.Module):
    """Logits from each channel's mean: a fixed, seeded linear map of [B, in_chans] means (the
    readers' tests: any channel count, any intensity range)."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(in_chans, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def channel_means(in_chans: int = 3, num_classes: int = 4) -> nn.Module:
    return ChannelMeans(in_chans, num_classes)


class PixelValue(nn.Module):
    """One map: the logit of the first input channel, so its sigmoid gives back the pixel's
    value (inputs normalized with mean 0, std 1: values in [0, 1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1].clamp(1e-6, 1 - 1e-6)
        return torch.log(v) - torch.log1p(-v)


def pixel_value() -> nn.Module:
    return PixelValue()


class TinyConv(nn.Module):
    """A small convolutional classifier (what inductor compiles in seconds)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class RefusesCompile(TinyConv):
    """Fails while torch.compile traces it; eager, it is TinyConv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            raise RuntimeError("this model cannot be traced")
        return super().forward(x)


class DiffersCompiled(TinyConv):
    """Compiled, its logits are doubled and shifted: a compiler that changes the numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * -2.0 + 1.0 if torch.compiler.is_compiling() else out


def tiny_conv(num_classes: int = 4) -> nn.Module:
    return TinyConv(num_classes)


def refuses_compile(num_classes: int = 4) -> nn.Module:
    return RefusesCompile(num_classes)


def differs_compiled(num_classes: int = 4) -> nn.Module:
    return DiffersCompiled(num_classes)


class InputCounter(LayoutReporter):
    """A LayoutReporter that counts the inputs it is handed (over every instance: ``InputCounter.seen``)."""

    seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        InputCounter.seen += x.shape[0]
        return super().forward(x)


def input_counter(num_classes: int = 4) -> nn.Module:
    return InputCounter(num_classes)
