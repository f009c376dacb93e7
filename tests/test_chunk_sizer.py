"""Runtime knobs resolved at run time: the forward_batch: auto chunk-size search (on simulated
per-input costs) and workers: auto."""

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


@pytest.mark.parametrize(
    "cores,device,setting,threads,expected",
    [
        (2, "cpu", "auto", None, (0, None)),  # decode in-process: no core taken from the forward
        (4, "cpu", "auto", None, (0, None)),
        (16, "cpu", "auto", None, (2, 14)),  # workers' cores left out of torch's threads
        (16, "cpu", "auto", 4, (2, 4)),  # an explicit thread count is kept
        (16, "cuda", "auto", None, (8, None)),
        (2, "cuda", "auto", None, (1, None)),
        (2, "cpu", 3, None, (3, None)),  # an explicit worker count is kept
    ],
)
def test_workers_auto(monkeypatch, cores, device, setting, threads, expected):
    import torch

    from kaggle_tta import plan

    monkeypatch.setattr(plan, "cpu_cores", lambda: cores)
    assert plan.resolve_workers(setting, torch.device(device), threads) == expected
