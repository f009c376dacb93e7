"""Runtime knobs resolved at run time: the forward_batch: auto chunk-size search and the
channels_last: auto layout trial (on simulated per-input costs), and workers: auto."""

from __future__ import annotations

import pytest

from kaggle_tta.exec.chunks import ChunkSizer


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


def _drive_layout(
    cost: dict[bool, float], size_costs: dict[int, float] | None = None, setting: int | str = 16, chunks: int = 200
) -> ChunkSizer:
    s = ChunkSizer(setting, 1024, (False, True))
    for _ in range(chunks):
        n = s.current
        s.report(n, n * cost[s.channels_last] * (size_costs[n] if size_costs else 1.0))
    return s


@pytest.mark.parametrize("cost,best", [({False: 1.0, True: 0.7}, True), ({False: 1.0, True: 1.1}, False)])
def test_layout_trial_keeps_the_faster_memory_format(cost, best):
    s = _drive_layout(cost)
    assert s.channels_last is best and s.layouts == [best] and not s.measuring
    assert s.current == 16  # a fixed forward_batch is left alone
    assert all(rec[0] >= ChunkSizer.LAYOUT_INPUTS for rec in s.layout_timing.values())  # both were timed


def test_layout_then_size_trials():
    s = _drive_layout({False: 1.0, True: 0.7}, {8: 1.5, 16: 1.2, 32: 1.0, 64: 1.1, 128: 1.3}, setting="auto")
    assert (s.channels_last, s.current) == (True, 32)


def test_out_of_memory_ends_the_trials_on_the_layout_in_use():
    s = ChunkSizer("auto", 1024, (False, True))
    s.report(8, 1.0)  # warm-up chunk of the first layout
    s.shrink()
    assert (s.channels_last, s.current, s.measuring) == (False, 4, False)


def test_time_too_times_the_decided_configuration_once_after_a_warm_up():
    """compile: auto's eager time: a settled sizer times 64 more inputs after a warm-up chunk
    (the warm-up's time, 99 s a chunk, is not in it); where a layout trial ran, its timing of
    the winner is the figure and nothing more is timed; decide() ends the timing early."""
    s = ChunkSizer(16, 1024)
    s.time_too(64)
    assert s.measuring and s.inputs_on_trial() == 16 + 64
    s.report(16, 99.0)
    for _ in range(4):
        s.report(16, 16 * 0.5)
    assert not s.measuring and s.per_input() == pytest.approx(0.5)
    t = _drive_layout({False: 1.0, True: 0.7}, chunks=0)
    t.time_too(64)
    assert t.inputs_on_trial() == t.trial_inputs()  # the trial times the winner on the way
    for _ in range(40):
        t.report(t.current, t.current * (0.7 if t.channels_last else 1.0))
    assert not t.measuring and t.channels_last and t.per_input() == pytest.approx(0.7)
    u = ChunkSizer(16, 1024)
    u.time_too(64)
    u.report(16, 1.0)
    assert u.decide() == (16, False) and not u.measuring and u.per_input() is None


def test_runner_times_both_layouts_and_keeps_the_faster(monkeypatch):
    """The runner converts model and input to the layout under trial, times the forward alone
    and then keeps the faster layout; every chunk's output is the model's own."""
    import time

    import torch
    from torch import nn

    from kaggle_tta.exec.forward import Runner

    seen: list[bool] = []

    class SlowUnlessChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            seen.append(cl)
            time.sleep(x.shape[0] * (0.0002 if cl else 0.003))
            return self.conv(x).mean((2, 3))

    model = SlowUnlessChannelsLast().eval()
    runner = Runner(model, torch.device("cpu"), "fp32", ChunkSizer(8, 64, (False, True)))
    x = torch.randn(8, 3, 5, 7)
    with torch.inference_mode():
        ref = model.conv(x).mean((2, 3))
        for _ in range(14):
            torch.testing.assert_close(runner(x), ref, atol=1e-6, rtol=1e-6)
    assert seen[0] is False and True in seen  # contiguous first, then channels_last tried
    assert runner.sizer.channels_last is True and not runner.sizer.measuring
    assert seen[-4:] == [True] * 4
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layouts", [(False, True), (True,)])
def test_a_model_without_channels_last_stays_contiguous(layouts):
    """A 5-D weight (a 3-D convolution) cannot take channels_last: the runner keeps the model
    contiguous instead of failing, and the trial ends there."""
    import torch
    from torch import nn

    from kaggle_tta.exec.forward import Runner

    class WithConv3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.conv3d = nn.Conv3d(1, 1, 1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + self.conv3d(x[:, None, :1]).mean((1, 2, 3, 4))[:, None]

    model = WithConv3d().eval()
    runner = Runner(model, torch.device("cpu"), "fp32", ChunkSizer(8, 64, layouts))
    x = torch.randn(8, 3, 5, 7)
    with torch.inference_mode():
        ref = model(x)
        for _ in range(12):
            torch.testing.assert_close(runner(x), ref)
    assert runner.sizer.channels_last is False and not runner.sizer.measuring
    assert model.conv.weight.is_contiguous()


@pytest.mark.parametrize(
    "setting,device,precision,expected",
    [
        ("auto", "cpu", "fp32", (False, True)),  # timed: resnet18 gains, convnext loses
        ("auto", "cpu", "bf16", (True,)),
        ("auto", "cuda", "fp32", (True,)),
        (False, "cuda", "bf16", (False,)),
        (True, "cpu", "fp32", (True,)),
    ],
)
def test_layout_candidates(setting, device, precision, expected):
    import torch

    from kaggle_tta.exec.chunks import layout_candidates

    assert layout_candidates(setting, torch.device(device), precision) == expected


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

    from kaggle_tta.engine import device as plan

    monkeypatch.setattr(plan, "cpu_cores", lambda: cores)
    assert plan.resolve_workers(setting, torch.device(device), threads) == expected


@pytest.mark.parametrize("as_list", [False, True])
def test_out_of_memory_splits_into_pieces_of_the_size_that_fits(as_list):
    """A chunk of 128 on a device that fits 40: it is redone in pieces of 64 (too big: 32),
    the size that fits (32) is kept for the rest of the chunk and later chunks, and the
    outputs come back in order (a tensor, or per-image results for detection)."""
    import torch
    from torch import nn

    from kaggle_tta.exec.forward import Runner

    class Fits40(nn.Module):
        def forward(self, x):
            if x.shape[0] > 40:
                raise torch.OutOfMemoryError("simulated")
            return x.flatten(1)[:, :3] * 2

    post = (lambda out, x: [(r,) for r in out]) if as_list else None
    runner = Runner(Fits40(), torch.device("cpu"), "fp32", ChunkSizer(128, 1024), post)
    x = torch.arange(128 * 3 * 2 * 2, dtype=torch.float32).reshape(128, 3, 2, 2)
    out = runner(x)
    expected = x.flatten(1)[:, :3] * 2
    if as_list:
        assert len(out) == 128
        torch.testing.assert_close(torch.stack([r[0] for r in out]), expected)
    else:
        torch.testing.assert_close(out, expected)
    assert runner.sizer.current == 32  # halving by halves would have ended at 16

    class Never(nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("simulated")

    from kaggle_tta.config.errors import CheckpointError

    # one input that does not fit is the user's to fix: the error names the member and the knobs
    with pytest.raises(
        CheckpointError, match=r"members\.big: one input of \(3, 2, 2\) does not fit in cpu memory .*input_size"
    ):
        Runner(Never(), torch.device("cpu"), "fp32", ChunkSizer(8, 1024), name="big")(torch.zeros(3, 3, 2, 2))


def test_run_summary_names_each_members_chunk_size_when_they_differ():
    from kaggle_tta.engine.stats import MemberStats, RunStats

    st = RunStats(device="cpu", precision="fp32", images=4)
    st.members = {
        "a": MemberStats("a", forward_batch=32),
        "b": MemberStats("b", forward_batch=32),
        "c": MemberStats("c"),
    }
    assert st.forward_batch == "32"  # c computed nothing
    st.members["b"].forward_batch = 64
    assert st.forward_batch == "32/64"
