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
