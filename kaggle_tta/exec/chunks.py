"""The forward's chunk size and memory layout: given, or timed on the stream's first chunks
(:class:`ChunkSizer`)."""

from __future__ import annotations

from collections import defaultdict

import torch


def sizes_text(sizes: list[int]) -> str:
    """Chunk sizes of several members: '32' when they agree, else '32/64' in member order."""
    return str(sizes[0]) if len(set(sizes)) == 1 else "/".join(map(str, sizes))


class ChunkSizer:
    """One member's forward tuning, decided on its first chunks:

    - the chunk size, when ``forward_batch: auto``: sizes 8..128 are timed in turn (in the
      first layout) and the fastest per input is kept;
    - then the memory layout, when more than one is given (``channels_last: auto`` on a CPU
      in fp32, where it depends on the model: measured 0.7x the time for resnet18 and
      efficientnet_b0 but 1.1x for convnext_nano on this project's CPUs), at the chunk size
      in use: each layout runs a warm-up chunk and then at least 32 timed inputs, and the
      faster per input is kept;
    - then, where :meth:`time_too` asked (``compile: auto`` deciding from the eager time), the
      decided configuration's time per input over at least that many inputs more, unless a
      trial timed it already (:meth:`per_input`).

    The configuration each chunk ran in is ``Runner.last_config``: rows computed in the one
    finally decided are kept, the others computed again (engine.stream).
    """

    CANDIDATES = (8, 16, 32, 64, 128)
    LAYOUT_INPUTS = 32
    UNTIMED = 32
    """The chunk size where ``auto`` is not timed (a run too small to repay the trial)."""
    REPAY = 10
    """Trials run only where the inputs to forward are at least this many times the trial's own
    (rows computed on trial in a configuration that lost are computed again in the decided
    one). Untimed, the layout is channels_last, the faster for most networks, so a trial gains
    only where a model prefers the other: convnext_nano measured 1.1x, a 10% gain that repays
    the trial from 10 times its inputs on. (The stream cuts its first loader batch
    where the trial ends: measured with a whole batch of 512 inputs computed again, resnet18
    d4 on 512 photos, the trial cost 16.6 s of a 156.5 s run on the 2-core EPYC.)"""

    def __init__(self, setting: int | str, ceiling: int, layouts: tuple[bool, ...] = (False,)):
        self.auto = setting == "auto"
        self.ceiling = max(1, ceiling)
        self.layouts = list(layouts)  # channels_last values still to try
        self.channels_last = self.layouts[0]
        self.layout_timing: dict[bool, list[float]] = {}  # layout -> [inputs, seconds]
        self.layout_warm = False
        self.wanted = 0  # time_too: inputs of the decided configuration still to time
        self.plain: list[float] = [0.0, 0.0]  # ... timed so far: [inputs, seconds]
        self.plain_warm = False
        if self.auto:
            self.trials = [c for c in self.CANDIDATES if c <= self.ceiling] or [self.ceiling]
            self.timing: dict[int, list[float]] = defaultdict(list)  # size -> [inputs, seconds]
            self.current = self.trials[0]
            self.warm = False
        else:
            self.trials = []
            self.current = int(setting)

    @property
    def measuring(self) -> bool:
        """True while reports decide something (then CUDA work is synchronized before timing)."""
        return not self.layout_settled or bool(self.trials) or self._timing_left

    @property
    def _timing_left(self) -> bool:
        return self.plain[0] < self.wanted and self._trial_per_input() is None

    def time_too(self, inputs: int) -> None:
        """Also times the decided configuration (after the trials, if any) over at least
        ``inputs`` inputs after a warm-up chunk, unless a trial measures it on the way."""
        self.wanted = inputs

    def per_input(self) -> float | None:
        """The decided configuration's seconds per input, as timed (None: not timed)."""
        trial = self._trial_per_input()
        if trial is None and self.plain[0]:
            return self.plain[1] / self.plain[0]
        return trial

    def _trial_per_input(self) -> float | None:
        """... as the chunk-size or layout trial timed it, where it did."""
        rec = self.layout_timing.get(self.channels_last) if len(self.layout_timing) > 1 else None
        if rec is None and self.auto:
            rec = self.timing.get(self.current)
        return rec[1] / rec[0] if rec and rec[0] else None

    def report(self, n: int, seconds: float) -> None:
        if self.trials:
            self._report_size(n, seconds)
        elif not self.layout_settled:
            self._report_layout(n, seconds)
        elif self._timing_left:
            if not self.plain_warm:
                self.plain_warm = True  # its first chunk pays one-off costs
            else:
                self.plain[0] += n
                self.plain[1] += seconds

    def _report_layout(self, n: int, seconds: float) -> None:
        if not self.layout_warm:  # a layout's first chunk pays its one-off costs (kernel choice)
            self.layout_warm = True
            return
        rec = self.layout_timing.setdefault(self.channels_last, [0.0, 0.0])
        rec[0] += n
        rec[1] += seconds
        if rec[0] < max(self.LAYOUT_INPUTS, 2 * self.current):
            return
        untried = [c for c in self.layouts if c not in self.layout_timing]
        if untried:
            self.channels_last, self.layout_warm = untried[0], False
        else:
            self.settle_layout(
                min(self.layout_timing, key=lambda c: self.layout_timing[c][1] / self.layout_timing[c][0])
            )

    def _report_size(self, n: int, seconds: float) -> None:
        if not self.warm:  # the first chunk pays one-off costs (allocations, kernel choice)
            self.warm = True
            return
        rec = self.timing[self.current]
        if not rec:
            rec.extend([0.0, 0.0])
        rec[0] += n
        rec[1] += seconds
        if rec[0] >= 2 * self.current and rec[0] >= 16:
            best = min(self.timing, key=lambda s: self.timing[s][1] / self.timing[s][0])
            i = self.trials.index(self.current)
            # Per-input cost is U-shaped in the chunk size: once a size is clearly slower than
            # the best so far, larger ones will not win, so the trials stop there.
            worse = (
                self.timing[self.current][1] / self.timing[self.current][0]
                > 1.05 * self.timing[best][1] / self.timing[best][0]
            )
            if i + 1 < len(self.trials) and not worse:
                self.current = self.trials[i + 1]
            else:
                self.current = best
                self.trials = []

    def trial_inputs(self) -> int:
        """About how many inputs the trials still to run forward (each size: a warm-up chunk and
        two more; each layout: a warm-up chunk and at least LAYOUT_INPUTS)."""
        sizes = sum(c + max(2 * c, 16) for c in self.trials)
        c = max(self.trials, default=self.current)
        layouts = 0 if self.layout_settled else len(self.layouts) * (c + max(self.LAYOUT_INPUTS, 2 * c))
        return sizes + layouts

    def inputs_on_trial(self) -> int:
        """:meth:`trial_inputs` and the decided configuration's timing still to run (its rows
        are kept where nothing else changes: they do not count against a trial's repay)."""
        settled = self.layout_settled and not self.trials  # else the trial times it on the way
        timed = self.current + self.wanted - int(self.plain[0]) if settled and self._timing_left else 0
        return self.trial_inputs() + timed

    def repays(self, inputs: int) -> bool:
        """Whether ``inputs`` to forward repay the trials (:data:`REPAY`)."""
        return inputs >= self.REPAY * self.trial_inputs()

    def untimed(self) -> tuple[int, bool]:
        """Ends every trial untimed: ``auto`` sizes at :data:`UNTIMED` (within the ceiling),
        and channels_last where it is a candidate (the faster layout for most convolutional
        networks on every device measured); returns (chunk size, channels_last)."""
        if self.trials:
            self.current, self.trials = min(self.UNTIMED, self.ceiling), []
        self.settle_layout(True if True in self.layouts else self.layouts[0])
        return self.current, self.channels_last

    @property
    def layout_settled(self) -> bool:
        return len(self.layouts) == 1

    def settle_layout(self, channels_last: bool) -> None:
        """Ends the layout trial on ``channels_last`` (the model cannot take the other)."""
        self.channels_last, self.layouts = channels_last, [channels_last]

    def decide(self) -> tuple[int, bool]:
        """Ends every trial now (a test set smaller than the trials): the fastest size and
        layout measured so far, else the ones in use; returns (chunk size, channels_last)."""
        if self.trials:
            timed = {s: t for s, t in getattr(self, "timing", {}).items() if t and t[0]}
            if timed:
                self.current = min(timed, key=lambda s: timed[s][1] / timed[s][0])
            self.trials = []
        if not self.layout_settled:
            timed_l = {c: t for c, t in self.layout_timing.items() if t[0]}
            self.settle_layout(
                min(timed_l, key=lambda c: timed_l[c][1] / timed_l[c][0])
                if len(timed_l) == len(self.layouts)
                else self.layouts[0]
            )
        self.wanted = 0
        return self.current, self.channels_last

    def shrink(self, failed: int | None = None) -> None:
        """After out-of-memory on a chunk of ``failed`` inputs: half of it (or of the current size)."""
        self.current = max(1, min(self.current, failed or self.current) // 2)
        self.ceiling = self.current
        self.trials, self.wanted = [], 0
        self.settle_layout(self.channels_last)  # out of memory mid-trial: keep the layout in use


def layout_candidates(setting: bool | str, device: torch.device, precision: str) -> tuple[bool, ...]:
    """The channels_last values to use (one) or to time on the first chunks (two).

    ``auto``: on with CUDA or reduced precision, where it is the fast path of cuDNN and oneDNN;
    timed on a CPU in fp32, where the answer depends on the model.
    """
    if setting != "auto":
        return (bool(setting),)
    if device.type == "cuda" or precision != "fp32":
        return (True,)
    return (False, True)
