"""``runtime.compile``: a member's forward through ``torch.compile``, checked and remembered.

For each member whose model runs dense outputs (classification scores, segmentation maps):

- ``false``: eager. ``true``: compiled. ``auto``: compiled where the run's forward time repays
  the compile time: ``inputs x (eager - compiled seconds per input) > compile seconds``, with
  the figures this model measured on this machine before (kaggle_tta.exec.decisions), else the
  eager time the stream measures on its first chunks (rows kept where the member stays eager;
  ``ChunkSizer.time_too``), :data:`EXPECTED_SPEEDUP` and a cold compile
  (:data:`COLD_SECONDS`); there, the inputs on trial that eager keeps and a compiled member
  computes again count against the compile. A run of fewer than :data:`MIN_INPUTS` inputs
  does not measure.
- A compiled member runs one chunk shape (``forward_batch``, the last chunk padded; no chunk
  size or layout trial, whose every size would compile again), so it compiles once per view
  shape.
- The first time on a machine, the compiled forward runs on the first rows and is compared
  with the eager forward in fp32 there, with ``precision: auto``'s bounds
  (kaggle_tta.exec.precision.compare_precision); a member that fails to compile, or disagrees,
  runs eager with one line saying why. The verdict and timings are remembered per model,
  precision, chunk shape, machine and torch version, so a later run checks nothing again.
- The compiled program is kept on disk by inductor's own caches, under
  ``$TORCHINDUCTOR_CACHE_DIR`` (default: ``inductor/`` in the decisions store,
  ``~/.cache/kaggle-tta``), so a later run compiles from the cache in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kaggle_tta.engine.phases import phase
from kaggle_tta.engine.plan import Plan
from kaggle_tta.engine.precision import PROBE_INPUTS, first_batches, ragged
from kaggle_tta.exec import decisions
from kaggle_tta.exec.forward import MemberWork, Runner
from kaggle_tta.exec.precision import ProbeWork, compare_precision

COLD_SECONDS = {"cpu": 40.0, "cuda": 60.0}
"""A compile not measured before on this machine (inductor, cold caches): measured 19-47 s for
resnet18 on 2-core CPUs; CUDA adds autotuning."""
EXPECTED_SPEEDUP = 1.25
"""Eager over compiled time per input, where this model has not been measured: the low end of
what resnet18 measured on CPUs (1.15x-2.9x by precision and layout)."""
MIN_INPUTS = 1024
"""``auto`` below this many inputs to forward: eager, nothing measured (a cold compile takes
tens of seconds; a thousand inputs of a model worth compiling take less)."""


@dataclass
class CompileChoice:
    """What ``runtime.compile`` decided for one member: the compiled forward (None: eager) and
    one line saying why, where there is something to say."""

    compiled: Any = None
    note: str = ""
    pending: bool = False  # auto, decided once the stream has timed the eager forward


def may_compile(setting: bool | str, device: torch.device, inputs: int) -> bool:
    """Whether ``runtime.compile`` is to be considered at all (without measuring anything)."""
    return setting is True or (setting == "auto" and inputs >= MIN_INPUTS and device.type in COLD_SECONDS)


def choose_compile(
    plan: Plan, w: MemberWork, runner: Runner, device: torch.device, workers: int, inputs: int
) -> CompileChoice:
    """Decides, checks where needed, and returns the member's forward (see the module); called
    where :func:`may_compile`. ``auto`` where this model's eager time on this machine is not
    remembered returns ``pending``: the stream times it on its first chunks, whose rows are kept
    where the member stays eager, and decides then (:func:`compile_on_trial`)."""
    setting = plan.cfg.runtime.compile
    if ragged(plan, w.member):
        return CompileChoice(note="eager: not compiled (its outputs are lists of boxes, with no element-wise check)")
    k = record_key(w, runner, device)
    rec = decisions.recall_verdict(plan.cache_root, k)
    if rec is not None and rec["ran_in"] == "eager":  # failed or disagreed before on this machine
        return CompileChoice(note=str(rec.get("note", "")))
    if rec is None and setting == "auto":
        return CompileChoice(pending=True)
    eager_store: dict[str, np.ndarray] | None = None
    batches = None
    if rec is None:  # compile: true: the eager time, measured once per model and machine
        batches = first_batches(plan, [w.member], workers, device, rows=_rows(w, runner))
        eager_store, eager_s = _timed_pass(plan, w, runner, batches, runner.precision)
        rec = {"ran_in": "untried", "eager_s": eager_s}
        decisions.remember_verdict(plan.cache_root, k, rec)
    return _choose(plan, w, runner, device, workers, inputs, k, rec, batches, eager_store)


def compile_on_trial(
    plan: Plan, w: MemberWork, runner: Runner, device: torch.device, workers: int, kept: int = 0
) -> CompileChoice:
    """``auto``, once the stream's first chunks timed the eager forward in the configuration
    its trial decided (or the one given): that time, remembered for this model and machine,
    against the compile. A member compiled now computes its rows on trial again, compiled: the
    ``kept`` inputs that staying eager would keep count against the compile."""
    eager_s = runner.sizer.per_input()
    if eager_s is None:
        return CompileChoice(note="eager: not compiled (the eager forward was not timed: too few inputs, or memory)")
    k = record_key(w, runner, device)
    rec = {"ran_in": "untried", "eager_s": eager_s}
    decisions.remember_verdict(plan.cache_root, k, rec)
    return _choose(plan, w, runner, device, workers, w.compile_pending, k, rec, kept=kept)


def _choose(
    plan: Plan,
    w: MemberWork,
    runner: Runner,
    device: torch.device,
    workers: int,
    inputs: int,
    k: str,
    rec: dict[str, Any],
    batches: list | None = None,
    eager_store: dict[str, np.ndarray] | None = None,
    kept: int = 0,
) -> CompileChoice:
    est = {"compiled_s": float(rec["eager_s"]) / EXPECTED_SPEEDUP, "compile_s": COLD_SECONDS[device.type], **rec}
    # eager, the rest of the run; compiled, all of it again (``kept`` inputs already ran eager)
    gain = inputs * (float(est["eager_s"]) - float(est["compiled_s"])) - kept * float(est["eager_s"])
    if plan.cfg.runtime.compile == "auto" and gain <= float(est["compile_s"]):
        return CompileChoice(
            note=f"eager: compiling (about {float(est['compile_s']):.0f}s) would not repay itself on {inputs} inputs "
            + (f"of which {kept} already ran eager " if kept else "")
            + f"(about {max(gain, 0.0):.0f}s saved)"
        )
    batches = batches or first_batches(plan, [w.member], workers, device, rows=_rows(w, runner))
    return _compile_and_check(plan, w, runner, device, batches, k, est, eager_store)


def record_key(w: MemberWork, runner: Runner, device: torch.device) -> str:
    """Where a member's compile verdict and timings are remembered: the model (not the test
    set), its precision, chunk shape and layout, this machine and the torch version."""
    text = json.dumps(
        [
            "compile",
            w.member.model_key,
            runner.precision,
            runner.sizer.current,
            runner.sizer.channels_last,
            decisions.machine(device),
            torch.__version__,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _rows(w: MemberWork, runner: Runner) -> int:
    """Rows for the check: two chunks' inputs over the member's views at least (the first chunk
    compiles; the rest is timed), and PROBE_INPUTS."""
    return math.ceil(max(PROBE_INPUTS, 2 * runner.sizer.current) / max(1, len(w.views)))


def _timed_pass(
    plan: Plan, w: MemberWork, runner: Runner, batches: list, precision: str, compiled: Any = None
) -> tuple[dict[str, np.ndarray], float]:
    """The member's step on ``batches`` into memory, in ``precision``, eager or through
    ``compiled``: (view -> rows as they would be cached, forward seconds per input over the
    chunks after each input shape's first)."""
    saved = runner.precision, runner.compiled
    runner.chunk_times, runner.precision, runner.compiled = [], precision, compiled
    try:
        work = ProbeWork(w.member, None, list(w.views), runner, rows=batches[-1].hi)  # type: ignore[arg-type]
        plan.task.open_views(work, plan)
        with torch.inference_mode():
            for batch in batches:
                plan.task.step(work, batch, plan)
        seen: set[tuple[int, ...]] = set()
        times = []  # each input shape's first chunk compiles (or warms up): not timed
        for shape, t in runner.chunk_times:
            if shape in seen:
                times.append((shape[0], t))
            seen.add(shape)
        times = times or [(shape[0], t) for shape, t in runner.chunk_times]
        return work.store, sum(t for _, t in times) / max(1, sum(n for n, _ in times))
    finally:
        runner.chunk_times = None
        runner.precision, runner.compiled = saved


def _compile_and_check(
    plan: Plan,
    w: MemberWork,
    runner: Runner,
    device: torch.device,
    batches: list,
    k: str,
    rec: dict[str, Any],
    eager_store: dict[str, np.ndarray] | None,
) -> CompileChoice:
    phase(f"compiling {w.member.name} (torch.compile, {backend()})")
    program = compiled_model(runner.model)
    if rec.get("ran_in") == "compiled":  # checked before on this machine: it compiles at its first chunk
        runner.compiled = program
        return CompileChoice(program, f"compiled (as before on this machine; {rec.get('note', '')})")
    t0 = time.perf_counter()
    store, compiled_s = _timed_pass(plan, w, runner, batches, runner.precision, program)
    if runner.compile_failure:  # the runner went on eager
        note, runner.compile_failure = runner.compile_failure, ""
        decisions.remember_verdict(plan.cache_root, k, {"ran_in": "eager", "note": note})
        return CompileChoice(note=note)
    compile_s = max(0.0, time.perf_counter() - t0 - compiled_s * sum(int(a.shape[0]) for a in store.values()))
    reference = eager_store if eager_store is not None and runner.precision == "fp32" else None
    if reference is None:
        reference, _ = _timed_pass(plan, w, runner, batches, "fp32")
    check = compare_precision(store, reference, "compiled")
    ok = check.ran_in == "compiled"
    what = check.note.split(": ", 1)[1].removeprefix("compiled ")  # "top-1 agreed on ...", "checked against fp32 ..."
    note = (
        what.replace("against fp32", "against eager fp32", 1)
        if ok
        else f"eager: the compiled forward disagreed with eager fp32 ({what})"
    )
    eager_s = float(rec["eager_s"])
    verdict = {"ran_in": "compiled" if ok else "eager", "note": note, "compile_s": round(compile_s, 3)}
    decisions.remember_verdict(plan.cache_root, k, {**verdict, "eager_s": eager_s, "compiled_s": compiled_s})
    if not ok:
        return CompileChoice(note=note)
    runner.compiled = program
    return CompileChoice(
        program,
        f"compiled in {compile_s:.1f}s, {1e3 * compiled_s:.2f} ms per input against {1e3 * eager_s:.2f} eager; {note}",
    )


def backend() -> str:
    """torch.compile's backend: inductor, or ``$KAGGLE_TTA_COMPILE_BACKEND`` (``aot_eager`` to
    see whether a model traces, without generating code)."""
    return os.environ.get("KAGGLE_TTA_COMPILE_BACKEND") or "inductor"


def compiled_model(model: torch.nn.Module) -> Any:
    """``torch.compile(model)`` for fixed shapes, its program cached under the decisions store."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into the environment when first asked; a folder the user chose stays
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(decisions.home() / decisions.INDUCTOR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    import torch._dynamo

    conf = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one program per view shape (rot90 of a non-square)
        if hasattr(conf, name):
            setattr(conf, name, max(64, int(getattr(conf, name))))
    return torch.compile(model, dynamic=False, backend=backend())
