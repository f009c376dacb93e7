"""The precision each member runs in: ``precision: auto`` resolved to bf16 or fp16 is checked
against fp32 on the first rows (every view), once per member and cache entry; the verdict is
recorded in the manifest of the entry the rows go to and reused."""

from __future__ import annotations

import math
import time

import torch

from kaggle_tta.cache import CacheEntry
from kaggle_tta.cache.entry import DamagedEntry
from kaggle_tta.config.errors import DataError, KaggleTTAError
from kaggle_tta.engine.phases import phase
from kaggle_tta.engine.plan import MemberPlan, Plan
from kaggle_tta.exec import decisions
from kaggle_tta.exec.chunks import ChunkSizer, layout_candidates
from kaggle_tta.exec.forward import Runner
from kaggle_tta.exec.precision import PrecisionCheck, ProbeWork, compare_precision
from kaggle_tta.io import models as model_io
from kaggle_tta.io.data import Batch, make_loader
from kaggle_tta.io.readers import reader_of

REDUCED = ("bf16", "fp16")


PROBE_INPUTS = 64  # the precision check forwards at least this many inputs (images x views) per member
CHECK_REPAY = 3
"""A member is checked only where it forwards at least this many times the check's inputs:
the check forwards them twice (reduced and fp32) and keeps neither, so with reduced precision
at half fp32's time it pays from three times on; below, the member runs in fp32, unchecked."""


def choose_precisions(
    plan: Plan, device: torch.device, precision: str, workers: int = 0, models: dict | None = None
) -> dict[str, PrecisionCheck]:
    """The precision each member runs in.

    Where runtime.precision is given (bf16, fp16, fp32) or ``auto`` resolved to fp32, that one,
    unchecked: an explicit reduced precision is the user's choice and is never overridden.
    Where ``auto`` resolved to bf16 or fp16, each member is checked against fp32 once:

    - the first rows of the test set (at least one loader batch, and enough rows for
      :data:`PROBE_INPUTS` inputs over the member's views) go through the task's own step
      twice, in the reduced precision and in fp32, into memory (forward.ProbeWork), so the
      check compares exactly what would be cached, in every view (on real digit scans the
      worst view, a 1.1 scale, agreed on 88.8% of top-1 where the identity agreed on 99.2%);
    - bounds (forward.compare_precision): in every view top-1 agreement (per-pixel argmax
      agreement for ``[N, K, h, w]`` maps) >= 99.5% of the probed inputs (pixels) and
      relative L2 error ||reduced - fp32|| / ||fp32|| <= 1e-2; a non-finite reduced output
      fails too. A member outside them runs in fp32, and its rows go to its fp32 entry
      (``m.fingerprint("fp32")``, the same as an explicit fp32 run's, so the cache never
      holds fp32 numbers under a reduced key). Detection members are not checked: their
      outputs are lists of boxes, with no element-wise error; their note says so.
    - the verdict is recorded in the manifest of the entry the rows go to
      (``precision_checks: {bf16: {ran_in, note, ...}}``) and reused by later runs, so a
      resumed or repeated run neither checks again nor changes its mind, and a member whose
      entries are complete builds no model. A fallback recorded in the fp32 entry wins over a
      pass recorded in the reduced one (two machines that disagreed: fp32 is the safe answer).

    Why before the loop, not on the stream's first chunks (as chunk-size trials are): the
    precision is part of each entry's fingerprint and lock, so deciding first means each
    member locks, opens and writes one entry, never switching files, locks or the loader's
    start mid-run; and the check always uses the first rows of the test set, not the first
    rows still missing, so a resumed run would decide alike. The cost: the check's forwards
    (the probed inputs, twice) are not kept, once per member and cache entry.

    ``models`` receives the models the check built, for the run to use again.
    """
    out = {m.name: PrecisionCheck(precision, "") for m in plan.members}
    if plan.cfg.runtime.precision != "auto" or precision not in REDUCED:
        return out
    todo: list[MemberPlan] = []
    for m in plan.members:
        known = recorded_check(plan, m, precision)
        if known is None:  # checked before on this machine for this model, on other images
            known = remembered_check(plan, m, precision, device)
            if known is not None:
                record_check(plan, m, precision, known)  # the entry read by blend says it too
        if known is not None:
            out[m.name] = known
        else:
            todo.append(m)
    todo = _without_small(plan, todo, precision, out)
    if todo:
        phase(f"checking {precision} against fp32 ({', '.join(m.name for m in todo)})")
        checks = probe_precisions(plan, todo, device, precision, workers, models if models is not None else {})
        for m in todo:
            out[m.name] = checks[m.name]
            if checks[m.name].details:  # "not checked" (detection) is not recorded: nothing was measured
                record_check(plan, m, precision, checks[m.name])
                remember_check(plan, m, precision, device, checks[m.name])
    return out


def _without_small(
    plan: Plan, todo: list[MemberPlan], precision: str, out: dict[str, PrecisionCheck]
) -> list[MemberPlan]:
    """``todo`` less the members too small to repay their check: those run in fp32, and their
    fp32 entry says why (a blend reads it there)."""
    small = [m for m in todo if _too_small(plan, m, precision, out)]
    for m in small:
        record_check(plan, m, precision, out[m.name])
    return [m for m in todo if m not in small]


def _too_small(plan: Plan, m: MemberPlan, precision: str, out: dict[str, PrecisionCheck]) -> bool:
    """Whether ``m``'s run cannot repay its check (:func:`check_repays`); it then runs in fp32."""
    repays, inputs, probe = check_repays(plan, m)
    if repays or ragged(plan, m):  # a detection member is not checked: nothing to repay
        return False
    out[m.name] = PrecisionCheck(
        "fp32",
        f"fp32: {inputs} inputs to forward, too few to repay checking {precision} against fp32 "
        f"(which forwards {probe} inputs twice)",
    )
    return True


def ragged(plan: Plan, m: MemberPlan) -> bool:
    """Whether ``m``'s task stores ragged rows (detection boxes), which are not checked."""
    trial = ProbeWork(m, None, list(m.views))  # type: ignore[arg-type]
    plan.task.open_views(trial, plan)
    return trial.ragged


def check_repays(plan: Plan, m: MemberPlan) -> tuple[bool, int, int]:
    """(whether ``m``'s inputs are at least :data:`CHECK_REPAY` times the check's, its inputs,
    the check's inputs)."""
    rows = min(len(plan.testset), max(plan.cfg.runtime.batch_size, math.ceil(PROBE_INPUTS / max(1, len(m.views)))))
    probe, inputs = rows * len(m.views), len(plan.testset) * len(m.views)
    return inputs >= CHECK_REPAY * probe, inputs, probe


def verdict_key(m: MemberPlan, precision: str, device: torch.device) -> str:
    """Where a member's precision verdict is remembered: the model (not the test set), the
    reduced precision and this machine (kaggle_tta.exec.decisions)."""
    import hashlib
    import json

    text = json.dumps(["precision", m.model_key, precision, decisions.machine(device)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def remember_check(plan: Plan, m: MemberPlan, precision: str, device: torch.device, c: PrecisionCheck) -> None:
    verdict = {"ran_in": c.ran_in, "note": c.note, **c.details}
    decisions.remember_verdict(plan.cache_root, verdict_key(m, precision, device), verdict)


def remembered_check(plan: Plan, m: MemberPlan, precision: str, device: torch.device) -> PrecisionCheck | None:
    rec = decisions.recall_verdict(plan.cache_root, verdict_key(m, precision, device))
    if rec is None:
        return None
    details = {k: v for k, v in rec.items() if k not in ("ran_in", "note")}
    return PrecisionCheck(str(rec["ran_in"]), str(rec.get("note", "")), details)


def check_entry(plan: Plan, m: MemberPlan, precision: str) -> CacheEntry:
    return CacheEntry(plan.cache_root, m.name, m.fingerprint(precision), m.inputs)


def recorded_check(plan: Plan, m: MemberPlan, precision: str) -> PrecisionCheck | None:
    """The verdict of an earlier check of ``precision`` for ``m``: a fallback recorded in its
    fp32 entry first, then a pass recorded in its reduced entry."""
    for ran_in in ("fp32", precision):
        try:
            manifest = check_entry(plan, m, ran_in).manifest
        except DamagedEntry:  # a damaged manifest records nothing: checked again (the run clears it)
            continue
        rec = manifest.get("precision_checks", {}).get(precision)
        if isinstance(rec, dict) and rec.get("ran_in") == ran_in:
            return PrecisionCheck(
                ran_in, str(rec.get("note", "")), {k: v for k, v in rec.items() if k not in ("ran_in", "note")}
            )
    return None


def record_check(plan: Plan, m: MemberPlan, precision: str, check: PrecisionCheck) -> None:
    """Writes the verdict into the manifest of the entry the rows go to, under its lock (best
    effort: a read-only cache only means checking again next time)."""
    try:  # a damaged manifest is cleared by the run that writes the entry: nothing recorded now
        entry = check_entry(plan, m, check.ran_in)
        with entry.lock():
            entry.reload()
            rec = {
                "ran_in": check.ran_in,
                "note": check.note,
                **check.details,
                "checked": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            entry.manifest.setdefault("precision_checks", {})[precision] = rec
            entry.save()
    except (OSError, KaggleTTAError):
        pass


def probe_precisions(
    plan: Plan, members: list[MemberPlan], device: torch.device, precision: str, workers: int, models: dict
) -> dict[str, PrecisionCheck]:
    """Runs each member's step on the first rows in ``precision`` and in fp32 and compares
    (member name -> verdict). A member whose task stores ragged rows (detection boxes) is not
    checked, and its model is not built here."""
    rt, task = plan.cfg.runtime, plan.task
    out: dict[str, PrecisionCheck] = {}
    dense = []
    for m in members:
        if ragged(plan, m):
            out[m.name] = PrecisionCheck(
                precision,
                f"{precision}: not checked against fp32 (its outputs are lists of boxes, with no element-wise error)",
            )
        else:
            dense.append(m)
    if not dense:
        return out
    batches = first_batches(plan, dense, workers, device)
    rows = batches[-1].hi
    size = rt.forward_batch if isinstance(rt.forward_batch, int) else ChunkSizer.CANDIDATES[2]
    layout = layout_candidates(rt.channels_last, device, precision)[0]
    for m in dense:
        model = models[m.name] = model_io.build_model(plan.cfg, m.cfg, len(plan.classes)).to(device)
        runner = Runner(model, device, precision, ChunkSizer(size, size, (layout,)), task.post(plan, m.cfg), m.name)
        stores: dict[str, dict] = {}
        nonfinite = 0
        with torch.inference_mode():
            for p in (precision, "fp32"):
                runner.precision = p
                work = ProbeWork(m, None, list(m.views), runner, rows=rows)  # type: ignore[arg-type]
                task.open_views(work, plan)
                for batch in batches:
                    task.step(work, batch, plan)
                stores[p] = work.store
                if p == precision:
                    nonfinite = runner.nonfinite
        model.to(memory_format=torch.contiguous_format)  # the run's runner starts from this layout
        out[m.name] = compare_precision(stores[precision], stores["fp32"], precision, nonfinite)
    return out


def first_batches(
    plan: Plan, dense: list[MemberPlan], workers: int, device: torch.device, rows: int | None = None
) -> list[Batch]:
    """The loader's first batches: at least one, and enough rows for PROBE_INPUTS inputs over
    each checked member's views; or, with ``rows``, the first ``rows`` rows (the last batch cut)."""
    rt, n = plan.cfg.runtime, len(plan.testset)
    want = min(n, max(rt.batch_size, max(math.ceil(PROBE_INPUTS / max(1, len(m.views))) for m in dense)))
    want = want if rows is None else min(n, rows)
    batches = []
    specs = {m.canvas.key: m.canvas for m in dense}
    it = iter(
        make_loader(
            plan.testset.paths,
            specs,
            rt.batch_size,
            workers,
            0,
            pin_memory=device.type == "cuda",
            reader=reader_of(plan.cfg),
        )
    )
    try:
        for batch in it:
            if batch.error is not None:
                raise DataError(batch.error)
            if batch.hi >= want:
                batches.append(batch if rows is None or batch.hi == want else batch.rows(batch.lo, want))
                break
            batches.append(batch)
    finally:
        del it  # stops the workers
    return batches
