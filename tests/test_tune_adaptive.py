"""kaggle-tta tune learns the adaptive gates (#16): one threshold per member, the fewest extra
forwards that keep --keep-gain of the full TTA's gain; the blend then gives what tune said.

The demo (pipeline.yaml: 240 images, two members with d4, fp32) is computed once for the
module; what tune reports is checked against quantities computed here from the cache and
from `kaggle-tta blend --overrides tuned.yaml`, never against numbers written down.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

import kaggle_tta
from kaggle_tta.api import sources_for
from kaggle_tta.cli import main
from kaggle_tta.config import load_pipeline
from kaggle_tta.config.errors import CacheError
from kaggle_tta.engine.plan import build_plan
from kaggle_tta.exec.dag import node_predictions
from kaggle_tta.ops.gate import Gate, needs
from kaggle_tta.tuning.cache import GatedViewError, read_view

ROOT = Path(__file__).resolve().parents[1]
KEEP = 0.9


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[str]:
    """The demo's full cache (every view of every row); returns its --set strings."""
    tmp = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(tmp / "test")]) == 0
    sets = [
        f"data.folder={tmp / 'test'}",
        f"data.labels.path={tmp / 'test' / 'labels.csv'}",
        f"cache.dir={tmp / 'cache'}",
        f"submission.path={tmp / 'submission.csv'}",
        "runtime.precision=fp32",
    ]
    kaggle_tta.run(ROOT / "pipeline.yaml", overrides=sets, progress=False)
    return sets


def _labels(sets: list[str]) -> np.ndarray:
    cfg = load_pipeline(ROOT / "pipeline.yaml", sets)
    from kaggle_tta.io.data import load_labels

    plan = build_plan(cfg)
    return load_labels(cfg, plan.testset.ids, plan.classes)


def _accuracy(sets: list[str], files: list[Path], *more: str, source: Path | dict = ROOT / "pipeline.yaml") -> float:
    cfg = load_pipeline(source, [*sets, *more], base_dir=ROOT, override_files=files)
    return kaggle_tta.blend(cfg).row("final").scores_tta["accuracy"]


def _with_gate(adaptive: dict) -> dict:
    """pipeline.yaml with resnet's ``adaptive`` set (in the pipeline itself, under any override file)."""
    raw = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    raw["members"][0]["adaptive"] = adaptive
    return raw


def test_demo_gates_keep_the_gain_with_few_forwards(demo, tmp_path):
    """In sample, against what the cache gives: the gated pipeline (blend --overrides) gains
    at least KEEP of the full TTA's accuracy gain over each member's first view alone, with
    at most 40% of the full TTA's extra forwards (counted from the cached first views with
    adaptive.needs); and at most 40% of d4's, keeping KEEP of d4's gain over no TTA."""
    out = tmp_path / "tuned.yaml"
    r = kaggle_tta.tune(
        load_pipeline(ROOT / "pipeline.yaml", demo), out=out, folds=5, adaptive="confidence", keep_gain=KEEP
    )
    members = {m["name"]: m for m in yaml.safe_load(out.read_text())["members"]}
    assert all(
        set(m["adaptive"]) == {"first", "confidence", "margin"} and m["adaptive"]["margin"] is None
        for m in members.values()
    )

    full = _accuracy(demo, [out], *(f"members.{n}.adaptive=null" for n in members))
    gated = _accuracy(demo, [out])
    alone = [
        f"members.{n}.{k}={v}"
        for n, m in members.items()
        for k, v in (("tta", f"[{m['adaptive']['first']}]"), ("view_weights", "null"), ("adaptive", "null"))
    ]
    none = _accuracy(demo, [out], *alone)
    assert full > none, r.report()  # a gain to keep
    assert gated - none >= KEEP * (full - none) - 1e-12, r.report()

    plan = build_plan(load_pipeline(ROOT / "pipeline.yaml", demo, override_files=[out]))
    n = len(plan.testset.ids)
    run = full_extra = 0
    for s, mp in zip(sources_for(plan), plan.members):
        a = members[s.name]["adaptive"]
        send = needs(read_view(s, a["first"]), mp.activation, Gate(a["first"], "confidence", a["confidence"]))
        run += (len(s.views) - 1) * int(send.sum())
        full_extra += (len(s.views) - 1) * n
    assert run <= 0.4 * full_extra, r.report()

    t = r.tables["gates"]
    total = t.filter(pl.col("member") == "(all)").row(0, named=True)
    assert (
        total["extra forwards run"] == run and total["extra forwards run"] + total["extra forwards saved"] == full_extra
    )
    assert total["gain kept (in sample)"] == pytest.approx((gated - none) / (full - none))
    held = total[
        "gain kept (held out)"
    ]  # 5 folds, each tuned and gated on the other four (None: no held-out gain to keep)
    assert held is None or np.isfinite(held)
    assert 0.0 <= t.filter(pl.col("member") != "(all)")["share sent on (held out)"].min() <= 1.0
    assert any(note.startswith("adaptive: the gates keep") for note in r.notes)

    d4 = kaggle_tta.blend(load_pipeline(ROOT / "pipeline.yaml", demo)).row(
        "final"
    )  # the pipeline as it is: d4, untuned
    plain, d4_acc = d4.scores_plain["accuracy"], d4.scores_tta["accuracy"]
    assert d4_acc > plain and gated - plain >= KEEP * (d4_acc - plain)
    assert run <= 0.4 * 7 * n * len(members)  # d4: 7 extra views per member


@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_blend_with_the_overrides_gives_what_tune_reported(demo, tmp_path, rule, capsys):
    """kaggle-tta tune --adaptive RULE, then kaggle-tta blend --overrides: the submission's
    accuracy is tune's tuned score exactly, and every node's values bit for bit."""
    out = tmp_path / "tuned.yaml"
    sets = [x for s in demo for x in ("--set", s)]
    assert (
        main(["tune", str(ROOT / "pipeline.yaml"), *sets, "--out", str(out), "--folds", "0", "--adaptive", rule]) == 0
    )
    printed = capsys.readouterr().out
    assert "Adaptive gates" in printed and "tune needs" not in printed
    written = yaml.safe_load(out.read_text())
    assert all(m["adaptive"][rule] is not None for m in written["members"])
    tuned_acc = float(out.read_text().split(" tuned (in sample")[0].rsplit(" ", 1)[-1])  # the header tune wrote
    r = kaggle_tta.tune(load_pipeline(ROOT / "pipeline.yaml", demo), folds=0, adaptive=rule)
    assert r.overrides == written
    assert f"{r.estimate.in_sample['accuracy'][1]:.4f}" == f"{tuned_acc:.4f}"

    assert main(["blend", str(ROOT / "pipeline.yaml"), *sets, "--overrides", str(out)]) == 0
    capsys.readouterr()
    cfg = load_pipeline(ROOT / "pipeline.yaml", demo, override_files=[out])
    plan = build_plan(cfg)
    assert all(m.gate is not None and m.gate.rule == rule for m in plan.members)
    y = _labels(demo)
    sub = pl.read_csv(Path(cfg.submission.path))
    assert (sub["label"].to_numpy() == np.asarray(plan.classes)[y]).mean() == r.estimate.in_sample["accuracy"][1]
    nodes = node_predictions(cfg, sources_for(plan), 0, len(y))
    mine = r.estimate.tuned._nodes or {}
    for name, pred in nodes.items():
        assert np.array_equal(pred.values, mine[name].values), name


def test_the_search_scores_what_the_masked_merge_gives(demo):
    """The search selects rows of two merges (every row sent on, none) instead of merging
    again: at every candidate of every member, that equals reduce_views with the gate's masks."""
    from kaggle_tta.tuning.cache import open_sources
    from kaggle_tta.tuning.classes import ClassProblem
    from kaggle_tta.tuning.options import TuneOptions

    plan = build_plan(load_pipeline(ROOT / "pipeline.yaml", demo))
    opts = TuneOptions(folds=0, adaptive="margin")
    pb = ClassProblem(plan, open_sources(plan, "demo"), opts)
    tuned = pb.fit(np.ones(pb.n_units, bool))
    search = tuned.gate_search
    assert search is not None and search.learned and search.evaluations > 0
    for name, g in search.members.items():
        p = tuned.members[name]
        for j in range(len(g.candidates)):
            exact = pb.member_prediction(name, type(p)(p.weights, p.temperature, gate=g.gate(j)))
            assert np.array_equal(g.prediction(j).values, exact.values), (name, g.candidates[j])


def test_adaptive_off_writes_no_adaptive_and_the_default_follows_the_pipeline(demo, tmp_path):
    """By default a pipeline without adaptive learns no gate; --adaptive off on one that sets
    a gate writes adaptive: null (scored as plain TTA); by default such a member learns its
    own rule and the others none."""
    r = kaggle_tta.tune(load_pipeline(ROOT / "pipeline.yaml", demo), folds=0)
    assert all("adaptive" not in m for m in r.overrides["members"]) and "gates" not in r.tables

    gated = _with_gate({"margin": 0.5})
    as_is = _accuracy(demo, [], source=gated)
    assert as_is != _accuracy(demo, [])  # the gate changes the demo's blend: "as is" below sees it
    off = kaggle_tta.tune(load_pipeline(gated, demo, base_dir=ROOT), folds=0, adaptive="off", out=tmp_path / "off.yaml")
    assert off.estimate.in_sample["accuracy"][0] == as_is  # as is: the pipeline's gate, as the blend applies it
    members = {m["name"]: m for m in off.overrides["members"]}
    assert members["resnet"]["adaptive"] is None and "adaptive" not in members["effnet"], off.overrides
    assert _accuracy(demo, [tmp_path / "off.yaml"], source=gated) == off.estimate.in_sample["accuracy"][1]
    assert "gates" not in off.tables and any("adaptive is null" in n for n in off.notes)

    auto = kaggle_tta.tune(load_pipeline(gated, demo, base_dir=ROOT), folds=0, out=tmp_path / "auto.yaml")
    members = {m["name"]: m for m in auto.overrides["members"]}
    assert members["resnet"]["adaptive"]["margin"] is not None and members["resnet"]["adaptive"]["confidence"] is None
    assert "adaptive" not in members["effnet"]
    assert _accuracy(demo, [tmp_path / "auto.yaml"], source=gated) == auto.estimate.in_sample["accuracy"][1]


def test_keep_gain_one_keeps_all_of_it_and_zero_keeps_none(demo):
    """The constraint binds: keep-gain 1 keeps the whole in-sample gain; keep-gain 0 lets
    every gate go to the bottom (no extra forward), and costs never rise as it loosens."""
    runs = {
        k: kaggle_tta.tune(
            load_pipeline(ROOT / "pipeline.yaml", demo), folds=0, adaptive="confidence", keep_gain=k, keep_changes=0.0
        )
        for k in (1.0, 0.5, 0.0)
    }
    cost = {k: r.tables["gates"].filter(pl.col("member") == "(all)")["extra forwards run"][0] for k, r in runs.items()}
    search = runs[1.0].estimate.tuned.gate_search
    assert search.signed(search.adaptive) >= search.signed(search.full)
    assert cost[0.0] <= cost[0.5] <= cost[1.0] and cost[0.0] == 0


def _decisions(sets: list[str], files: list[Path], *more: str) -> np.ndarray:
    """The submission's class per row, from kaggle-tta blend."""
    cfg = load_pipeline(ROOT / "pipeline.yaml", [*sets, *more], base_dir=ROOT, override_files=files)
    kaggle_tta.blend(cfg)
    return pl.read_csv(Path(cfg.submission.path))["label"].to_numpy()


def test_keep_changes_makes_the_full_ttas_changed_decisions(demo, tmp_path):
    """The label-free constraint (--keep-changes): of the rows whose submitted class the full
    TTA changes (against each member's first view alone), the gated submission gives the full
    TTA's class on at least that share, counted here from blend's submissions. With keep-gain
    0 it alone binds: 0 lets every gate go to the bottom, and the cost never falls as it tightens."""
    cost, made = {}, {}
    for kc in (0.0, 0.5, 1.0):
        out = tmp_path / f"kc{kc}.yaml"
        r = kaggle_tta.tune(
            load_pipeline(ROOT / "pipeline.yaml", demo),
            out=out,
            folds=0,
            adaptive="margin",
            keep_gain=0.0,
            keep_changes=kc,
        )
        members = {m["name"]: m for m in r.overrides["members"]}
        gated = _decisions(demo, [out])
        full = _decisions(demo, [out], *(f"members.{n}.adaptive=null" for n in members))
        alone = [
            f"members.{n}.{k}={v}"
            for n, m in members.items()
            for k, v in (("tta", f"[{m['adaptive']['first']}]"), ("view_weights", "null"), ("adaptive", "null"))
        ]
        changed = full != _decisions(demo, [out], *alone)
        assert changed.sum() >= 3  # decisions to keep
        made[kc] = float((gated[changed] == full[changed]).mean())
        assert made[kc] >= kc - 1e-12, (kc, made[kc], r.report())
        assert (
            r.estimate.tuned.gate_search.changes_made == pytest.approx(made[kc])
            and r.estimate.tuned.gate_search.changed == changed.sum()
        )
        cost[kc] = r.tables["gates"].filter(pl.col("member") == "(all)")["extra forwards run"][0]
    assert cost[0.0] == 0 and cost[0.0] <= cost[0.5] <= cost[1.0] and cost[1.0] > 0 and made[1.0] == 1.0


def test_gated_views_are_refused_with_the_fix_and_the_fix_works(pipeline, tmp_path, capsys):
    """A cache whose views hold only a gate's rows: tune refuses in one line naming the
    member and the fix; the fix (infer with adaptive null) fills every row, then tune runs."""
    write, cfg = pipeline
    cfg = copy.deepcopy(cfg)
    cfg["members"] = [{**cfg["members"][1], "tta": "hflip"}]  # b: test_efficientnet, identity and hflip
    cfg["blends"] = []
    cfg["submission"]["source"] = "b"
    cfg["members"][0]["adaptive"] = {"confidence": 0.5}
    path = write(cfg)
    kaggle_tta.run(path, progress=False)
    with pytest.raises(GatedViewError) as err:
        kaggle_tta.tune(path, folds=0)
    assert isinstance(err.value, CacheError) and "members.b" in str(err.value)
    assert main(["tune", str(path), "--out", str(tmp_path / "t.yaml")]) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "tune needs every view of every row" in line and "Traceback" not in line
    assert "--set members.b.adaptive=null" in line and not (tmp_path / "t.yaml").exists()

    assert main(["infer", str(path), "--set", "members.b.adaptive=null"]) == 0
    capsys.readouterr()
    r = kaggle_tta.tune(path, folds=0, views=False, out=tmp_path / "t.yaml")
    assert r.tables["gates"].row(0, named=True)["rule"] == "confidence"  # the pipeline's rule, learned from full views


def test_no_gain_writes_no_gate(tmp_path):
    """Every view the identity's copy: the full TTA gains nothing over the first view alone,
    so no gate is learned (none written; the report says why)."""
    from test_tune import CLASSES6, classification, letters

    y, views = letters(200)
    same = {v: views["identity"].copy() for v in ("identity", "hflip", "vflip")}
    path = classification(tmp_path, {"net": same}, [CLASSES6[k] for k in y], CLASSES6)
    r = kaggle_tta.tune(path, folds=0, views=False, adaptive="confidence")
    assert "adaptive" not in r.overrides["members"][0], r.overrides
    search = r.estimate.tuned.gate_search
    assert not search.learned and search.full == search.none
    assert any("gains nothing" in n for n in r.notes), r.notes
    assert r.tables["gates"]["threshold"].null_count() == r.tables["gates"].height


def test_adaptive_is_refused_where_tune_learns_no_gate(tmp_path):
    """A problem that learns no gate (segmentation tunes its thresholds and min_area) refuses
    --adaptive RULE in one line, before reading the cache, rather than ignoring it."""
    import cv2
    from test_tune import write_images

    from kaggle_tta.config.errors import ConfigError

    ids = write_images(tmp_path / "images", 4)
    (tmp_path / "masks").mkdir()
    for i in ids:
        cv2.imwrite(str(tmp_path / "masks" / f"{i}.png"), np.zeros((4, 4), np.uint8))
    cfg = {
        "task": "segmentation",
        "multilabel": True,
        "data": {"folder": str(tmp_path / "images"), "classes": ["a"], "masks": {"folder": str(tmp_path / "masks")}},
        "runtime": {"device": "cpu", "precision": "fp32"},
        "cache": {"dir": str(tmp_path / "cache")},
        "members": [{"name": "px", "factory": "helpers:per_pixel", "kwargs": {"out_channels": 1}, "tta": "hflip"}],
        "submission": {"path": str(tmp_path / "sub.csv")},
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match=r"^--adaptive margin: tune learns gates for the tuners classes; .*use --adaptive off$"
    ):
        kaggle_tta.tune(path, adaptive="margin")


def _gates_of(r) -> dict:
    return {m["name"]: m["adaptive"] for m in r.overrides["members"]}


def test_calibrate_keep_learns_the_gates_at_the_lowest_keep_that_holds_out(demo, monkeypatch):
    """--calibrate-keep (with folds): the gates are learned at the lowest in-sample keep of the
    ladder whose held-out gain kept, pooled over the folds, reaches --keep-gain (1.0 where none
    does): the very gates tune --folds 0 --keep-gain THAT learns. Its held-out figure at the
    keep chosen is the estimate's (the same folds, the same gates). The held-out figures are
    then replaced by a table to make the ladder climb."""
    from kaggle_tta.tuning import gates
    from kaggle_tta.tuning.classes import KEEP_LADDER

    cfg = load_pipeline(ROOT / "pipeline.yaml", demo)
    r = kaggle_tta.tune(cfg, folds=3, adaptive="margin", keep_gain=0.9)
    search = r.estimate.tuned.gate_search
    ladder = [k for k, *_ in search.calibration]
    assert ladder == [0.9, *KEEP_LADDER]
    assert all(
        (se is not None and se > 0) == (v is not None) for _, v, se in search.calibration
    )  # each figure with its spread
    chosen = next(
        (k for k, v, se in search.calibration if v is not None and v >= 0.9), 1.0
    )  # --keep-margin 0 (default): the figure alone
    assert search.keep == chosen
    held = r.tables["gates"].filter(pl.col("member") == "(all)")["gain kept (held out)"][0]
    assert {k: v for k, v, _ in search.calibration}[chosen] == pytest.approx(held)
    assert any("--calibrate-keep" in n and " ± " in n for n in r.notes)
    again = kaggle_tta.tune(cfg, folds=3, adaptive="margin", keep_gain=0.9)
    assert (
        again.estimate.tuned.gate_search.calibration == search.calibration
    )  # the resamples are seeded: the same figures
    off = kaggle_tta.tune(cfg, folds=3, adaptive="margin", keep_gain=0.9, calibrate_keep=False)
    assert off.estimate.tuned.gate_search.keep == 0.9 and off.estimate.tuned.gate_search.calibration == []

    real = gates.held_out
    rising = {0.9: 0.8, 0.925: 0.85, 0.95: 0.91, 0.975: 0.95, 1.0: 1.0}
    # (held-out figures, --keep-margin, their SE, the keep chosen): with a margin the figure must
    # clear --keep-gain by that many SEs (0.95 - 1 x 0.05 reaches 0.9; 0.91 - 0.5 x 0.05 does not)
    for table, margin, se, expect in (
        (rising, 0.0, 0.05, 0.95),
        ({k: 0.5 for k in ladder}, 0.0, None, 1.0),
        (rising, 1.0, 0.05, 0.975),
        (rising, 0.5, 0.05, 0.975),
    ):

        def fake(search, nodes, pb, rows, threshold, seed=0, table=table):
            h = real(search, nodes, pb, rows, threshold, seed)
            assert h is None or (
                h.boot is not None and h.boot.shape == (gates.BOOTSTRAP, 3) and np.isfinite(h.boot).all()
            )
            return None if h is None else gates.HeldOut(h.rows, 0.0, 1.0, table[search.keep], h.sent)

        with monkeypatch.context() as m:
            m.setattr(gates, "held_out", fake)
            m.setattr(gates, "pooled_spread", lambda search, folds, se=se: se)
            climbed = kaggle_tta.tune(cfg, folds=3, adaptive="margin", keep_gain=0.9, keep_margin=margin)
        assert climbed.estimate.tuned.gate_search.keep == expect
        assert [c[2] for c in climbed.estimate.tuned.gate_search.calibration] == [se] * len(ladder)
        at = kaggle_tta.tune(cfg, folds=0, adaptive="margin", keep_gain=expect)
        assert _gates_of(climbed) == _gates_of(at)


def test_the_spread_of_the_gain_kept_is_the_bootstrap_of_the_rows_where_the_gates_decide_otherwise():
    """gates.pooled_spread on accuracy: the gates and the full TTA decide alike on all rows but
    ``d`` (half of them wrongly, half rightly for the gates); the share kept is then 1 + (right
    - wrong) / G for a full gain of G rows, whose spread is about sqrt(d) / G (paired: the rows
    decided alike add nothing). Within 25% over 200 resamples; 0 where no row differs; None
    without the rows to resample."""
    from kaggle_tta.tuning import gates

    search = gates.GateSearch("accuracy", True, 0.9, 0, {}, {})
    rng = np.random.default_rng(3)

    def fold(n: int, helped: int, d: int) -> gates.HeldOut:
        none = np.zeros(n, bool)
        full = np.zeros(n, bool)
        full[:helped] = True  # the full TTA gets these right, no TTA does not
        ad = full.copy()
        ad[rng.choice(helped, d // 2, replace=False)] = False  # the gates lose d/2 rows the full TTA gets right
        ad[helped + rng.choice(n - helped, d - d // 2, replace=False)] = True  # and get d/2 right that it does not
        assert int((ad != full).sum()) == d
        cols = [none, full, ad]

        def again(idx: np.ndarray) -> tuple[float, float, float]:
            a, b, c = (float(x[idx].mean()) for x in cols)
            return a, b, c

        return gates.HeldOut(n, *again(np.arange(n)), {}, gates.resampled(again, n, rng))

    folds = [fold(2000, 60, 16) for _ in range(3)]
    differ = sum(16 for _ in folds)
    se = gates.pooled_spread(search, folds)
    assert se == pytest.approx(differ**0.5 / 180, rel=0.25)
    same = [fold(2000, 60, 0) for _ in range(3)]
    assert gates.pooled_spread(search, same) == 0.0
    assert gates.pooled_spread(search, [gates.HeldOut(10, 0.1, 0.2, 0.2, {})]) is None
    assert gates.pooled_kept(search, same) == pytest.approx(1.0)
    # a resample a user's metric refused (NaN: see held_out) is left out, not spread to the SE
    hurt = [gates.HeldOut(f.rows, f.none, f.full, f.adaptive, {}, f.boot.copy()) for f in folds]
    hurt[0].boot[:20] = np.nan
    assert np.isfinite(gates.pooled_spread(search, hurt)) and gates.pooled_spread(search, hurt) == pytest.approx(
        se, rel=0.2
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-margin", "-1"], "--keep-margin: -1.0; give standard errors between 0 and 10"),
        (["--keep-changes", "1.5"], "--keep-changes: 1.5; give a share"),
    ],
)
def test_bad_gate_options_are_one_line_before_the_cache_is_read(tmp_path, capsys, argv, message):
    assert main(["tune", str(ROOT / "pipeline.yaml"), "--set", f"cache.dir={tmp_path / 'none'}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kaggle-tta: error: {message}") and "\n" not in err, err
    assert not (tmp_path / "none").exists()
