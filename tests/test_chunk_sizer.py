"""forward_batch: auto — the chunk-size search, on simulated per-input costs."""

from __future__ import annotations

import pytest

from kaggle_tta.engine import ChunkSizer


def _drive(cost_per_input: dict[int, float], ceiling: int = 1024, chunks: int = 200) -> int:
    s = ChunkSizer("auto", ceiling)
    for _ in range(chunks):
        n = s.current
        s.report(n, n * cost_per_input[n])
    return s.current


@pytest.mark.parametrize(
    "costs,best",
    [
        ({8: 1.0, 16: 1.2, 32: 1.3, 64: 1.5, 128: 1.6}, 8),  # this CPU: smallest chunks win
        ({8: 1.5, 16: 1.2, 32: 1.0, 64: 1.1, 128: 1.3}, 32),  # U-shaped
        ({8: 2.0, 16: 1.5, 32: 1.2, 64: 1.1, 128: 1.0}, 128),  # a GPU: the larger the better
    ],
)
def test_auto_settles_on_the_cheapest_size(costs, best):
    assert _drive(costs) == best


def test_fixed_size_and_shrink():
    s = ChunkSizer(48, 1000)
    s.report(48, 1.0)
    assert s.current == 48
    s.shrink()
    assert s.current == 24
    assert ChunkSizer("auto", 10).current == 8  # candidates never exceed images x views
