"""Model factories for the torchrun tests (tests/test_torchrun.py), through `factory: rank_models:...`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn


class SlowMarked(nn.Module):
    """A small seeded classifier whose every forward takes ``delay`` seconds more, and whose
    first forward leaves ``<marks>/<rank>.<restart>.<pid>``: the test kills a rank by it."""

    def __init__(self, marks: str, delay: float, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        self.marks, self.delay, self.marked = Path(marks), delay, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.marked:
            self.marked = True
            self.marks.mkdir(parents=True, exist_ok=True)
            tag = f"{os.environ.get('RANK', 'x')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.{os.getpid()}"
            (self.marks / tag).write_text("")
        time.sleep(self.delay)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def slow_marked(marks: str, delay: float = 0.0, num_classes: int = 4) -> nn.Module:
    return SlowMarked(marks, delay, num_classes)


def _die_before_join() -> None:
    """Rank 1 of the first round exits, without a word, once rank 0 is in the launcher's store
    and before rank 1 itself has joined it (KAGGLE_TTA_TEST_DIE_BEFORE_JOIN set)."""
    import datetime

    from torch.distributed import TCPStore

    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=60),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not store.check(["kaggle-tta/hello/0"]):
        time.sleep(0.05)
    os._exit(3)


if __name__ == "__main__":
    # torchrun ... tests/rank_models.py ARGS: kaggle-tta's CLI (ARGS as after 'kaggle-tta'), with the fault above
    import sys

    if (
        os.environ.get("KAGGLE_TTA_TEST_DIE_BEFORE_JOIN")
        and os.environ.get("RANK") == "1"
        and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    ):
        _die_before_join()
    from kaggle_tta.cli import main

    sys.exit(main(sys.argv[1:]))
