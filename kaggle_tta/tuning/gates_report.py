"""What the report says of the adaptive gates (kaggle_tta.tuning.gates): the gates table (per
member and together: extra forwards run and saved, the share of the full TTA's gain kept, in
sample and held out) and its one-line summary."""

from __future__ import annotations

from typing import Any

import numpy as np

from kaggle_tta.tuning import gates
from kaggle_tta.tuning.gate_results import GateSearch, HeldOut


def table(search: GateSearch, folds: list[HeldOut], n: int) -> Any:
    """Per member: rule, first view, threshold, rows sent on, extra forwards run and saved;
    then every member together with the share of the full TTA's gain kept, in sample and
    held out (pooled over the folds: each fold's gains weighed by its rows)."""
    import polars as pl

    rows = []
    run_total, full_total = 0, 0
    for name, g in search.members.items():
        sent = int(g.sends[g.at].sum()) if search.learned else n
        run, full = (g.views - 1) * sent, (g.views - 1) * n
        held = [f.sent[name] / f.rows for f in folds if name in f.sent]
        rows.append(
            _row(
                name,
                g.rule,
                g.first,
                g.views,
                g.threshold if search.learned else None,
                sent / n if n else None,
                run,
                full,
                float(np.mean(held)) if held else None,
            )
        )
        run_total += run
        full_total += full
    for name, extra in search.ungated.items():
        rows.append(_row(name, None, None, extra + 1, None, 1.0, extra * n, extra * n, 1.0 if folds else None))
        run_total += extra * n
        full_total += extra * n
    total = _row("(all)", None, None, None, None, None, run_total, full_total, None)
    total["gain kept (in sample)"] = search.kept(search.none, search.full, search.adaptive)
    total["gain kept (held out)"] = gates.pooled_kept(search, folds)
    rows.append(total)
    return pl.DataFrame(rows, infer_schema_length=None)


def _row(
    member: str,
    rule: str | None,
    first: str | None,
    views: int | None,
    threshold: float | None,
    share: float | None,
    run: int,
    full: int,
    held_share: float | None,
) -> dict[str, Any]:
    return {
        "member": member,
        "rule": rule,
        "first view": first,
        "views": views,
        "threshold": threshold,
        "share sent on": share,
        "share sent on (held out)": held_share,
        "extra forwards run": run,
        "extra forwards saved": full - run,
        "saved": (full - run) / full if full else None,
        "gain kept (in sample)": None,
        "gain kept (held out)": None,
    }


def summary(search: GateSearch, folds: list[HeldOut], n: int) -> str:
    """One line: what the gates keep and cost, in sample and held out."""
    t = table(search, folds, n).row(-1, named=True)
    run, saved = t["extra forwards run"], t["extra forwards saved"]
    kept, held = t["gain kept (in sample)"], t["gain kept (held out)"]
    pct = f"{100 * run / (run + saved):.1f}%" if run + saved else "—"
    text = (
        f"adaptive: the gates keep {_pct(kept)} of the full TTA's {search.metric} gain in sample "
        f"({search.none:.4f} with each member's first view alone, {search.full:.4f} full TTA, "
        f"{search.adaptive:.4f} gated) at {run} of {run + saved} extra forwards ({pct}), "
        f"keep-gain {search.keep:g}"
    )
    if search.learned and search.changed:
        text += (
            f"; they make {_pct(search.changes_made)} of the {search.changed} decisions the full TTA changes "
            f"as it does (keep-changes {search.keep_changes:g})"
        )
    if folds:
        se = gates.pooled_spread(search, folds)
        text += f"; held out ({len(folds)} folds, each tuned and gated on the others) {_pct(held)}" + (
            "" if se is None or held is None else f" ± {100 * se:.1f}% (bootstrap SE)"
        )
        if search.calibration:
            text += " (the in-sample keep was chosen on these folds: this overstates a little; new images tell)"
    return text


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"
