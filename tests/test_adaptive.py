"""Adaptive views (#16): the first view for every image, the others where it is not sure.

What is checked: a gate that skips nothing is plain TTA, file for file; a gate that skips
rows holds exactly the rows it needs (each equal to plain TTA's row, the others zero) and
blends equal to an oracle computed from a plain cache with the same row masks; a tighter
gate re-blends from the cache, a looser one computes again; a killed run resumes; bad
settings fail in one line before any forward; the per-row masked merge equals merging each
row's views alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import kaggle_tta
from kaggle_tta.config import load_pipeline
from kaggle_tta.config.errors import KaggleTTAError
from kaggle_tta.ops.gate import Gate, needs, scores
from kaggle_tta.ops.merge import VIEW_REDUCERS, activate, reduce_views

ROOT = Path(__file__).resolve().parents[1]
D4 = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse"]
TOL = 1e-5  # fp32, one thread: a row forwarded in a smaller chunk may differ in the last bits


def _one_member(cfg: dict, tmp: Path, name: str, **adaptive) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["members"] = [cfg["members"][1]]  # b: test_efficientnet with d4
    cfg["blends"] = []
    cfg["runtime"]["threads"] = 1
    cfg["submission"] = {"path": str(tmp / f"{name}.csv"), "format": "probs", "source": "b"}
    cfg["cache"]["dir"] = str(tmp / f"cache-{name}")
    if adaptive:
        cfg["members"][0]["adaptive"] = adaptive
    return cfg


def _entry_dir(cache: Path) -> Path:
    (d,) = [p for p in (cache / "b").iterdir() if p.is_dir()]
    return d


def _views(cache: Path) -> dict[str, np.ndarray]:
    d = _entry_dir(cache)
    return {v: np.load(d / f"{v}.npy") for v in D4}


def _oracle(plain: dict[str, np.ndarray], send: np.ndarray) -> np.ndarray:
    """Member b's probabilities (merge mean of logits) with rows not sent on merging identity alone."""
    full = np.mean([plain[v] for v in D4], axis=0)
    return activate(np.where(send[:, None], full, plain["identity"]), "softmax")


def _probs(path: Path) -> np.ndarray:
    return pl.read_csv(path).drop("id").to_numpy()


def _gated(plain_run, tmp: Path, name: str) -> tuple[Path, float]:
    """Member b gated at its median identity confidence, run once into cache-<name>: (pipeline, threshold)."""
    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    path = write(_one_member(cfg, tmp, name, confidence=t), f"{name}.yaml")
    kaggle_tta.run(path, progress=False)
    return path, t


@pytest.fixture
def plain_run(pipeline, tmp_path):
    write, cfg = pipeline
    base = _one_member(cfg, tmp_path, "plain")
    kaggle_tta.run(write(base, "plain.yaml"), progress=False)
    return write, cfg, _views(tmp_path / "cache-plain")


@pytest.mark.parametrize("rule", ["confidence", "margin"])
def test_a_gate_that_skips_nothing_is_plain_tta(plain_run, tmp_path, rule):
    """Threshold 1.0: every image gets every view; the cache and the submission equal plain
    TTA's byte for byte, and no view records a gate."""
    write, cfg, _ = plain_run
    kaggle_tta.run(write(_one_member(cfg, tmp_path, "one", **{rule: 1.0}), "one.yaml"), progress=False)
    a, b = _entry_dir(tmp_path / "cache-plain"), _entry_dir(tmp_path / "cache-one")
    assert a.name == b.name  # the gate is not part of the fingerprint
    for v in D4:
        assert (a / f"{v}.npy").read_bytes() == (b / f"{v}.npy").read_bytes(), v
    states = json.loads((b / "manifest.json").read_text())["views"]
    assert not any("held" in st for st in states.values())
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


@pytest.mark.parametrize("forward_batch", [16, "auto"])
def test_gated_views_hold_exactly_the_rows_the_gate_needs(plain_run, tmp_path, forward_batch, trials_always):
    """The median first-view confidence as threshold: about half the rows get the other
    seven views. Those rows equal plain TTA's (within TOL), the others are zeros; the forwards
    are counted (rows computed again after a chunk-size trial once); the submission equals
    the oracle merge of the plain cache with those masks."""
    write, cfg, plain = plain_run
    conf = scores(plain["identity"], "softmax", "confidence")
    t = float(np.median(conf))
    gate = Gate("identity", "confidence", t)
    gated = _one_member(cfg, tmp_path, "gated", confidence=t)
    gated["runtime"]["forward_batch"] = forward_batch
    res = kaggle_tta.run(write(gated, "gated.yaml"), progress=False)
    got = _views(tmp_path / "cache-gated")
    np.testing.assert_allclose(
        got["identity"], plain["identity"], atol=TOL
    )  # forwarded alone, not packed with other views
    send = needs(got["identity"], "softmax", gate)  # the gate reads the first view as cached
    assert 0 < send.sum() < len(send)
    for v in D4[1:]:
        np.testing.assert_allclose(got[v][send], plain[v][send], atol=TOL, err_msg=v)
        assert (got[v][~send] == 0).all(), v
    states = json.loads((_entry_dir(tmp_path / "cache-gated") / "manifest.json").read_text())["views"]
    assert "held" not in states["identity"] and all(states[v]["held"] == gate.record("softmax") for v in D4[1:])
    d = _entry_dir(tmp_path / "cache-gated")
    assert all(
        np.array_equal(np.load(d / f"_held_{v}.npy"), send.astype(np.uint8)) for v in D4[1:]
    )  # which rows each holds
    f = res.stats.members["b"].forwards
    n = len(send)
    assert (f.run, f.full) == (n + 7 * int(send.sum()), 8 * n)
    np.testing.assert_allclose(_probs(tmp_path / "gated.csv"), _oracle(plain, send), atol=1e-5)


def test_a_tighter_gate_reblends_from_the_cache_and_a_looser_one_computes(plain_run, tmp_path):
    write, cfg, plain = plain_run
    conf = scores(plain["identity"], "softmax", "confidence")
    hi_t, lo_t = (float(q) for q in np.quantile(conf, [0.75, 0.25]))
    path = write(_one_member(cfg, tmp_path, "gated", confidence=hi_t), "gated.yaml")
    kaggle_tta.run(path, progress=False)
    # a tighter gate (fewer rows sent on): the cache holds them all; no model runs
    tighter = kaggle_tta.run(path, overrides=[f"members.0.adaptive.confidence={lo_t}"], progress=False)
    assert tighter.stats.all_cached
    send_lo = needs(_views(tmp_path / "cache-gated")["identity"], "softmax", Gate("identity", "confidence", lo_t))
    np.testing.assert_allclose(_probs(tmp_path / "gated.csv"), _oracle(plain, send_lo), atol=1e-5)
    # a looser one: blend alone refuses in one line; run computes the seven views again
    with pytest.raises(KaggleTTAError, match=r"hflip \(computed for the rows of the gate confidence"):
        kaggle_tta.blend(load_pipeline(path, ["members.0.adaptive.confidence=1.0"]))
    with pytest.raises(KaggleTTAError, match="computed for the rows of the gate"):
        kaggle_tta.blend(load_pipeline(path, ["members.0.adaptive=null"]))  # plain TTA needs every row too
    looser = kaggle_tta.run(path, overrides=["members.0.adaptive=null"], progress=False)
    assert sorted(looser.stats.members["b"].views_computed) == sorted(D4[1:])
    np.testing.assert_allclose(_probs(tmp_path / "gated.csv"), _probs(tmp_path / "plain.csv"), atol=1e-5)
    # and now (every row held) any gate re-blends from the cache
    assert kaggle_tta.run(path, progress=False).stats.all_cached


def test_a_row_a_gated_view_does_not_hold_is_never_read(plain_run, tmp_path):
    """Each gated view records which rows it holds. Where the first view's scores now send on
    a row the view did not compute (a first view computed again, another machine's rounding
    at the threshold), that row merges the views it has; its zeros are never read."""
    from kaggle_tta.cache.files import data_crc

    write, cfg, plain = plain_run
    path, t = _gated(plain_run, tmp_path, "gated")
    d = _entry_dir(tmp_path / "cache-gated")
    got = _views(tmp_path / "cache-gated")
    sent = needs(got["identity"], "softmax", Gate("identity", "confidence", t))
    row = int(np.flatnonzero(~sent)[0])  # confident: the gated views hold zeros there
    first = np.load(d / "identity.npy")
    first[row] = 0.0  # uniform: now below the gate
    np.save(d / "identity.npy", first)
    man = json.loads((d / "manifest.json").read_text())
    man["views"]["identity"]["crc32"] = data_crc(first)
    (d / "manifest.json").write_text(json.dumps(man))
    res = kaggle_tta.blend(load_pipeline(path))
    probs = _probs(tmp_path / "gated.csv")
    np.testing.assert_allclose(probs[row], 0.25, atol=1e-6)  # the first view alone, not a mean with seven zero rows
    got["identity"] = first
    np.testing.assert_allclose(probs, _oracle(got, sent), atol=1e-5)
    assert res.row("b").forwards.run == len(sent) + 7 * int(sent.sum())  # what the views hold


def test_a_changed_activation_computes_the_gated_views_again(plain_run, tmp_path):
    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    path = write(_one_member(cfg, tmp_path, "gated", confidence=t), "gated.yaml")
    kaggle_tta.run(path, progress=False)
    with pytest.raises(
        KaggleTTAError,
        match=r"hflip \(computed for the rows of the gate confidence > .* \(softmax\), not confidence > .* \(sigmoid\)\)",
    ):
        kaggle_tta.blend(load_pipeline(path, ["members.0.activation=sigmoid"]))
    again = kaggle_tta.run(path, overrides=["members.0.activation=sigmoid"], progress=False)
    assert sorted(again.stats.members["b"].views_computed) == sorted(D4[1:])


def test_without_tta_is_the_gates_first_view(plain_run, tmp_path):
    """first: hflip (identity is gated): the no-TTA column is hflip alone, for every row."""
    write, cfg, plain = plain_run
    hf = plain["hflip"]
    t = float(np.median(scores(hf, "softmax", "confidence")))
    res = kaggle_tta.run(
        write(_one_member(cfg, tmp_path, "hf", first="hflip", confidence=t), "hf.yaml"), progress=False
    )
    labels = pl.read_csv(Path(cfg["data"]["labels"]["path"]))
    classes = cfg["data"]["classes"]
    y = np.array([classes.index(c) for c in labels["label"]])
    got = _views(tmp_path / "cache-hf")["hflip"]
    assert res.blend.row("b").scores_plain["accuracy"] == pytest.approx(float((got.argmax(axis=1) == y).mean()))


@pytest.mark.parametrize("lose_first", [False, True])
def test_an_interrupted_adaptive_run_resumes_to_the_same_cache(plain_run, tmp_path, monkeypatch, lose_first):
    """Interrupted inside the third batch (after seven forwards), then run again: it computes
    only the rows not committed, and every file equals a run in one go (within TOL), with
    the same rows held."""
    from kaggle_tta.exec.forward import Runner

    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    kaggle_tta.run(write(_one_member(cfg, tmp_path, "whole", confidence=t), "whole.yaml"), progress=False)
    path = write(_one_member(cfg, tmp_path, "resumed", confidence=t), "resumed.yaml")
    original, calls = Runner.__call__, {"n": 0}

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return original(self, x)

    with monkeypatch.context() as m:
        m.setattr(Runner, "__call__", flaky)
        with pytest.raises(KeyboardInterrupt):
            kaggle_tta.run(path, progress=False)
    states = json.loads((_entry_dir(tmp_path / "cache-resumed") / "manifest.json").read_text())["views"]
    done = {st["rows_done"] for st in states.values() if st.get("status") == "partial"}
    n = len(plain["identity"])
    assert done and all(0 < d < n for d in done), states
    with monkeypatch.context() as m:
        if lose_first:
            # the first view's partial file is lost, and computed again it comes out otherwise
            # (here: logits x 1.2): the gated views start again from its first row too, so the
            # rows they hold are the ones the final first view sends on
            (_entry_dir(tmp_path / "cache-resumed") / "identity.npy.partial").unlink()
            m.setattr(Runner, "__call__", lambda self, x: original(self, x) * 1.2)
        res = kaggle_tta.run(path, progress=False)
    assert (res.stats.rows_computed == n) if lose_first else (0 < res.stats.rows_computed < n)
    a, b = _views(tmp_path / "cache-whole"), _views(tmp_path / "cache-resumed")
    d = _entry_dir(tmp_path / "cache-resumed")
    send = needs(b["identity"], "softmax", Gate("identity", "confidence", t))
    assert 0 < send.sum() < n
    for v in D4:
        if not lose_first:
            np.testing.assert_allclose(a[v], b[v], atol=TOL, err_msg=v)
            assert ((a[v] == 0).all(axis=1) == (b[v] == 0).all(axis=1)).all(), v
        if v != "identity":  # the rows held are the ones the final first view sends on, and only those
            assert np.array_equal(np.load(d / f"_held_{v}.npy").astype(bool), send), v
            assert (b[v][~send] == 0).all() and (b[v][send] != 0).any(axis=1).all(), v


@pytest.mark.parametrize(
    "adaptive, match",
    [
        (
            {"first": "hlfip", "confidence": 0.9},
            r"members\.b\.adaptive\.first: 'hlfip' is not one of the member's views .*did you mean 'hflip'",
        ),
        ({"confidence": 0.9, "margin": 0.2}, r"members\[0\]\.adaptive.*exactly one of confidence or margin"),
        ({}, r"members\[0\]\.adaptive.*exactly one of confidence or margin"),
        ({"confidence": 1.5}, r"members\[0\]\.adaptive\.confidence.*between 0 and 1"),
        ({"confidence": 0.9, "gate": 1}, r"members\[0\]\.adaptive: unknown key 'gate'"),
    ],
)
def test_bad_adaptive_settings_fail_in_one_line_before_any_forward(pipeline, tmp_path, adaptive, match):
    write, cfg = pipeline
    c = _one_member(cfg, tmp_path, "bad")
    c["members"][0]["adaptive"] = adaptive
    with pytest.raises(KaggleTTAError, match=match) as exc:
        kaggle_tta.run(write(c, "bad.yaml"), progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "cache-bad" / "b").exists()


def test_adaptive_needs_views_to_skip_and_probabilities(pipeline, tmp_path):
    write, cfg = pipeline
    c = _one_member(cfg, tmp_path, "bad")
    c["members"][0].update(tta="none", adaptive={"confidence": 0.5})
    with pytest.raises(KaggleTTAError, match=r"members\.b\.adaptive: the member has one view"):
        kaggle_tta.run(write(c, "bad.yaml"), progress=False)
    c["members"][0].update(tta="d4", activation="none")
    with pytest.raises(KaggleTTAError, match=r"members\.b\.adaptive: the gate reads probabilities"):
        kaggle_tta.run(write(c, "bad.yaml"), progress=False)


def test_adaptive_is_refused_where_the_task_has_no_gate():
    """Before any file is read (validate_static: the example's data need not exist)."""
    from kaggle_tta.engine.plan import validate_static

    cfg = load_pipeline(ROOT / "examples" / "detection.yaml", ["members.0.adaptive={confidence: 0.9}"])
    with pytest.raises(
        KaggleTTAError,
        match=rf"members\.{cfg.members[0].name}\.adaptive: adaptive views are for classification or segmentation",
    ):
        validate_static(cfg)


# ---- the gate's scores and the masked merge, against per-row oracles ----------------------------


def test_scores_and_gate_rules():
    logits = np.array([[4.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    p = activate(logits, "softmax")
    np.testing.assert_allclose(scores(logits, "softmax", "confidence"), p.max(axis=1), rtol=1e-6)
    srt = np.sort(p, axis=1)
    np.testing.assert_allclose(scores(logits, "softmax", "margin"), srt[:, -1] - srt[:, -2], rtol=1e-6, atol=1e-7)
    assert needs(logits, "softmax", Gate("identity", "margin", 0.5)).tolist() == [False, True, True]
    assert needs(
        logits, "softmax", Gate("identity", "confidence", 1.0)
    ).all()  # skips nothing, even a saturated softmax
    assert not needs(np.array([[80.0, -80.0]], np.float32), "softmax", Gate("identity", "confidence", 0.999999)).any()
    # multi-label: the least certain class decides
    ml = np.array([[5.0, -5.0], [5.0, 0.1]], np.float32)
    q = activate(ml, "sigmoid")
    np.testing.assert_allclose(scores(ml, "sigmoid", "confidence"), np.maximum(q, 1 - q).min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(scores(ml, "sigmoid", "margin"), np.abs(2 * q - 1).min(axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    "name, weighting",
    [(n, w) for n in VIEW_REDUCERS for w in ("equal", "views", "classes") if n != "max" or w == "equal"],
)
def test_masked_merge_equals_each_rows_views_merged_alone(name, weighting):
    """Tolerance 1e-5: float32 accumulation in another order. (merge max takes no weights.)"""
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(9, 5)).astype(np.float32) for _ in range(4)]
    masks = [None] + [rng.random(9) < 0.5 for _ in range(3)]
    weights = (
        None if weighting == "equal" else rng.random(4) + 0.1 if weighting == "views" else rng.random((4, 5)) + 0.1
    )
    got = reduce_views(name, arrays, "softmax", weights, 1.7, masks)
    for i in range(9):
        keep = [k for k, m in enumerate(masks) if m is None or m[i]]
        w = None if weights is None else weights[keep]
        want = reduce_views(name, [arrays[k][i : i + 1] for k in keep], "softmax", w, 1.7)
        np.testing.assert_allclose(got.values[i], want.values[0], rtol=1e-5, atol=1e-6, err_msg=f"row {i}")


# ---- segmentation: a per-image gate on the mean pixel confidence ---------------------------------


@pytest.fixture(scope="module")
def seg_images(tmp_path_factory) -> Path:
    """Eight 37x53 (odd, non-square) noise images with a bright rectangle each: uneven confidence."""
    import cv2

    root = tmp_path_factory.mktemp("seg") / "images"
    root.mkdir()
    rng = np.random.default_rng(5)
    for k in range(8):
        img = rng.integers(0, 60 + 25 * k, (37, 53, 3), dtype=np.uint8)
        img[5 : 5 + 3 * k + 4, 7 : 7 + 4 * k + 5, k % 3] = 250
        cv2.imwrite(str(root / f"im{k}.png"), img)
    return root


def _seg(images: Path, tmp: Path, name: str, dtype: str = "float32", tiling: dict | None = None, **adaptive) -> Path:
    import yaml

    m: dict = {"name": "px", "factory": "helpers:strided_per_pixel", "tta": "d4"}
    if tiling:
        m["tiling"] = tiling
    if adaptive:
        m["adaptive"] = adaptive
    cfg = {
        "task": "segmentation",
        "data": {"folder": str(images), "classes": ["a", "b", "c", "d"]},
        "runtime": {
            "device": "cpu",
            "precision": "fp32",
            "forward_batch": 5,
            "batch_size": 3,
            "workers": 0,
            "threads": 1,
        },
        "cache": {"dir": str(tmp / f"cache-{name}"), "dtype": dtype},
        "members": [m],
        "submission": {"path": str(tmp / f"{name}.csv")},
    }
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.parametrize(
    "dtype, tiling", [("float32", None), ("uint8", {"tile": [24, 20], "overlap": 0.3, "weight": "gaussian"})]
)
def test_segmentation_gates_images_on_their_mean_pixel_confidence(seg_images, tmp_path, dtype, tiling):
    """The median image score as threshold: the gated views hold exactly the images sent on
    (equal to plain TTA's maps within TOL; uint8: within one step), zeros elsewhere; the
    member's merged maps equal the masked oracle over the plain cache. Threshold 1.0 is plain
    TTA byte for byte."""
    from kaggle_tta.api import plan_of, sources_for
    from kaggle_tta.tasks import seg_maps as seg

    plain_path = _seg(seg_images, tmp_path, "plain", dtype, tiling)
    kaggle_tta.run(plain_path, progress=False)
    d = next(p for p in (tmp_path / "cache-plain" / "px").iterdir() if p.is_dir())
    plain = {v: np.load(d / f"{v}.npy") for v in D4}
    first = seg.as_logits(plain["identity"], "softmax")
    t = float(np.median(scores(first, "softmax", "confidence")))
    kaggle_tta.run(_seg(seg_images, tmp_path, "gated", dtype, tiling, confidence=t), progress=False)
    g = next(p for p in (tmp_path / "cache-gated" / "px").iterdir() if p.is_dir())
    got = {v: np.load(g / f"{v}.npy") for v in D4}
    tol = 1 if dtype == "uint8" else TOL
    np.testing.assert_allclose(got["identity"].astype(np.float32), plain["identity"].astype(np.float32), atol=tol)
    send = needs(seg.as_logits(got["identity"], "softmax"), "softmax", Gate("identity", "confidence", t))
    assert 0 < send.sum() < len(send)
    for v in D4[1:]:
        np.testing.assert_allclose(
            got[v][send].astype(np.float32), plain[v][send].astype(np.float32), atol=tol, err_msg=v
        )
        assert (got[v][~send] == 0).all(), v
    plan = plan_of(_seg(seg_images, tmp_path, "gated", dtype, tiling, confidence=t))
    (src,) = sources_for(plan)
    merged = seg.member_maps(src, 0, len(send)).values
    want = reduce_views(
        "mean", [seg.as_logits(got[v], "softmax") for v in D4], "softmax", masks=[None] + [send] * 7
    ).values
    np.testing.assert_allclose(merged, want, atol=1e-5)
    kaggle_tta.run(_seg(seg_images, tmp_path, "one", dtype, tiling, confidence=1.0), progress=False)
    o = next(p for p in (tmp_path / "cache-one" / "px").iterdir() if p.is_dir())
    assert all((o / f"{v}.npy").read_bytes() == (d / f"{v}.npy").read_bytes() for v in D4)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()


# ---- the must-show: the demo with d4 ---------------------------------------------------------------


def test_demo_d4_adaptive_run_keeps_the_gain_at_a_fraction_of_the_forwards(tmp_path):
    """The demo pipeline (two trained members, d4, fp32): `tune --adaptive confidence` learns
    the gates (alone: views, weights, temperatures and blend weights left as they are) on a
    full run's cache; then a run from an empty cache with those gates keeps >= 90% of d4's
    accuracy gain over no TTA, with <= 40% of d4's extra forwards, as the run counted them."""
    from kaggle_tta.cli import main

    assert main(["demo-data", str(tmp_path / "test")]) == 0
    sets = [
        f"data.folder={tmp_path / 'test'}",
        f"data.labels.path={tmp_path / 'test' / 'labels.csv'}",
        f"submission.path={tmp_path / 'submission.csv'}",
        "runtime.precision=fp32",
    ]
    full = kaggle_tta.run(ROOT / "pipeline.yaml", overrides=[*sets, f"cache.dir={tmp_path / 'full'}"], progress=False)
    d4 = full.blend.row("final")
    plain, d4_acc = d4.scores_plain["accuracy"], d4.scores_tta["accuracy"]
    assert d4_acc > plain  # a gain to keep
    gates = tmp_path / "gates.yaml"
    kaggle_tta.tune(
        load_pipeline(ROOT / "pipeline.yaml", [*sets, f"cache.dir={tmp_path / 'full'}"]),
        out=gates,
        folds=0,
        adaptive="confidence",
        views=False,
        view_weights=False,
        temperature=False,
        member_weights="off",
    )
    cfg = load_pipeline(ROOT / "pipeline.yaml", [*sets, f"cache.dir={tmp_path / 'adaptive'}"], override_files=[gates])
    assert all(m.adaptive is not None for m in cfg.members)
    ran = kaggle_tta.run(cfg, progress=False)
    n, members = len(ran.blend.table), 2
    f = ran.stats.forwards
    assert f.full == 8 * n * members
    extra, d4_extra = f.run - n * members, 7 * n * members
    row = ran.blend.row("final")
    assert row.scores_plain["accuracy"] == plain  # the first views are d4's identity views
    assert row.scores_tta["accuracy"] - plain >= 0.9 * (d4_acc - plain), (row, d4)
    assert extra <= 0.4 * d4_extra, (extra, d4_extra)
    assert row.forwards is not None and row.forwards.run == f.run  # the report counts what the run ran


@pytest.mark.parametrize("name", list(VIEW_REDUCERS))
@pytest.mark.parametrize("n_views", [3, 5, 8])
def test_masked_merge_of_a_row_every_view_holds_is_the_plain_merge_bit_for_bit(name, n_views):
    """Unweighted at temperature 1: the held rows are summed and divided by their count, as
    the plain merge does, so a row sent on to every view is exactly plain TTA's row."""
    rng = np.random.default_rng(n_views)
    arrays = [rng.normal(size=(64, 7)).astype(np.float32) for _ in range(n_views)]
    send = rng.random(64) < 0.5
    got = reduce_views(name, arrays, "softmax", masks=[None] + [send] * (n_views - 1)).values
    plain = reduce_views(name, arrays, "softmax").values
    first = reduce_views(name, arrays[:1], "softmax").values
    assert np.array_equal(got[send], plain[send])
    np.testing.assert_allclose(got[~send], first[~send], rtol=1e-6, atol=1e-7)


def _entry_files(cache: Path) -> dict[str, bytes]:
    """Every .npy of member b's entry (views and row masks), and the views' states (no timings)."""
    d = _entry_dir(cache)
    out = {f.name: f.read_bytes() for f in sorted(d.glob("*.npy"))}
    states = json.loads((d / "manifest.json").read_text())["views"]
    out["states"] = json.dumps(
        {v: {k: x for k, x in st.items() if k not in ("seconds", "crc32")} for v, st in states.items()}, sort_keys=True
    ).encode()
    return out


def _fixed(c: dict) -> dict:
    c["runtime"].update(channels_last=False, forward_batch=8, batch_size=4)  # one layout and chunking in every process
    return c


@pytest.mark.parametrize("how", ["devices", "shares"])
def test_adaptive_views_on_ranks_and_shares_equal_one_process(plain_run, tmp_path, how):
    """runtime.devices 2 (two ranks, started by the run) or two --share runs then a run that
    assembles them: the gated views, their row masks and the submission are byte-identical
    to one process's (fp32, one thread, fixed layout and chunking: every rank forwards the
    very batches one process does, and the gate chooses the same rows from the same first
    view); the forwards counted are one process's."""
    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    one = kaggle_tta.run(write(_fixed(_one_member(cfg, tmp_path, "one", confidence=t)), "one.yaml"), progress=False)
    c = _fixed(_one_member(cfg, tmp_path, "many", confidence=t))
    if how == "devices":
        c["runtime"]["devices"] = 2
        res = kaggle_tta.run(write(c, "many.yaml"), progress=False)
        assert len(res.stats.ranks) == 2, res.stats
    else:
        p = write(c, "many.yaml")
        shares = [kaggle_tta.infer(p, share=(k, 2), progress=False) for k in (0, 1)]
        res = kaggle_tta.run(p, progress=False)
        assert res.stats.rows_computed == 0
        counted = (sum(x.forwards.run for x in shares), sum(x.forwards.full for x in shares))
    if how == "devices":
        counted = (res.stats.forwards.run, res.stats.forwards.full)  # every rank's, in rank 0's summary
    assert counted == (one.stats.forwards.run, one.stats.forwards.full) and counted[0] < counted[1]
    a, b = _entry_files(tmp_path / "cache-one"), _entry_files(tmp_path / "cache-many")
    assert a.keys() == b.keys() and any(k.startswith("_held_") for k in a)
    for k in a:
        assert a[k] == b[k], k
    assert not (_entry_dir(tmp_path / "cache-many") / "shards").exists()
    assert (tmp_path / "many.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()


def test_shards_of_a_tighter_gate_are_not_taken_for_a_looser_one(plain_run, tmp_path):
    """Shares computed under one gate, then the pipeline with a looser one: the shards hold
    too few rows, so they are not assembled for it; it computes the gated views again (and
    ends as one process with the looser gate would), and the shards are left to no one."""
    write, cfg, plain = plain_run
    s = scores(plain["identity"], "softmax", "confidence")
    tight, loose = float(np.quantile(s, 0.25)), float(np.quantile(s, 0.75))
    p = write(_fixed(_one_member(cfg, tmp_path, "sh", confidence=tight)), "tight.yaml")
    for k in (0, 1):
        kaggle_tta.infer(p, share=(k, 2), progress=False)
    loose_p = write(_fixed(_one_member(cfg, tmp_path, "sh", confidence=loose)), "loose.yaml")
    res = kaggle_tta.run(loose_p, progress=False)
    assert set(res.stats.members["b"].views_computed) == set(D4[1:]), (
        res.stats
    )  # identity assembled from the shards; the gated views computed
    assert not (_entry_dir(tmp_path / "cache-sh") / "shards").exists()  # the tighter copies: nothing the entry lacks
    ref = kaggle_tta.run(write(_fixed(_one_member(cfg, tmp_path, "ref", confidence=loose)), "ref.yaml"), progress=False)
    assert ref.stats.forwards.run - res.stats.forwards.run == 24  # the first view's rows: assembled, not forwarded
    a, b = _entry_files(tmp_path / "cache-ref"), _entry_files(tmp_path / "cache-sh")
    for k in a:
        if k != "states":
            np.testing.assert_allclose(
                np.load(__import__("io").BytesIO(b[k])),
                np.load(__import__("io").BytesIO(a[k])),
                rtol=0,
                atol=TOL,
                err_msg=k,
            )


def test_plain_shares_over_a_gated_cache_assemble_plain_views(plain_run, tmp_path):
    """A gated cache, then the plain pipeline in two --share runs on the same cache: the
    assembly puts the shares' plain views in place of the gated ones (a gated view does not
    stand for a plain one), drops the held-row masks and the shards, and a plain run then
    computes nothing: every gated view ends equal to one plain process's."""
    write, cfg, plain = plain_run
    _gated(plain_run, tmp_path, "mix")
    d = _entry_dir(tmp_path / "cache-mix")
    assert sorted(p.name for p in d.glob("_held_*.npy")) == sorted(f"_held_{v}.npy" for v in D4 if v != "identity")
    p = write(_one_member(cfg, tmp_path, "mix"), "plain-mix.yaml")
    for k in (0, 1):
        kaggle_tta.infer(p, share=(k, 2), progress=False)
    res = kaggle_tta.run(p, progress=False)
    assert res.stats.rows_computed == 0, res.stats
    assert not list(d.glob("_held_*")) and not (d / "shards").exists()
    manifest = json.loads((d / "manifest.json").read_text())
    assert not any("held" in st for st in manifest["views"].values())
    got = _views(tmp_path / "cache-mix")
    for v in D4:  # every row (those the gate held back too); other chunks than plain's: the last bits may differ
        np.testing.assert_allclose(got[v], plain[v], rtol=0, atol=TOL, err_msg=v)
    np.testing.assert_allclose(_probs(tmp_path / "mix.csv"), _probs(tmp_path / "plain.csv"), rtol=0, atol=TOL)


def test_cache_verify_reads_the_held_row_masks_and_a_damaged_one_is_computed_again(plain_run, tmp_path, capsys):
    """A flipped byte in a gated view's held-row mask: cache verify names it and marks it; the
    next run computes that view again (and only it), to the same values."""
    from kaggle_tta.cli import main

    p, _ = _gated(plain_run, tmp_path, "v")
    d = _entry_dir(tmp_path / "cache-v")
    before = _views(tmp_path / "cache-v")
    assert main(["cache", "verify", str(p)]) == 0
    assert "hflip (its held rows) | ok" in capsys.readouterr().out
    mask = d / "_held_hflip.npy"
    raw = bytearray(mask.read_bytes())
    raw[-1] ^= 1  # the last row's byte: 0 <-> 1
    mask.write_bytes(bytes(raw))
    assert main(["cache", "verify", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hflip (its held rows)" in err[0] and "checksum" in err[0], err
    res = kaggle_tta.run(p, progress=False)
    ms = res.stats.members["b"]
    assert ms.views_computed == ["hflip"], ms
    after = _views(tmp_path / "cache-v")
    for v in D4:  # hflip forwarded alone now (other chunks): its last bits may differ
        np.testing.assert_allclose(after[v], before[v], rtol=0, atol=TOL if v == "hflip" else 0, err_msg=v)
    assert mask.read_bytes() != bytes(raw) and main(["cache", "verify", str(p)]) == 0


def test_a_damaged_share_keeps_the_gated_view_it_was_to_replace(plain_run, tmp_path):
    """Plain shares over a gated cache, one shard's hflip damaged (a flipped bit): the
    assembly leaves that view as it was, gated and whole (state, held-row mask, values), and
    rank 0's disk check counts every view a plain ranked run would write (a gated view too)."""
    from types import SimpleNamespace

    from kaggle_tta.cache import CacheEntry
    from kaggle_tta.cache.shards import assemble
    from kaggle_tta.engine.plan import build_plan
    from kaggle_tta.engine.shares import space_short

    write, cfg, plain = plain_run
    _gated(plain_run, tmp_path, "dmg")
    d = _entry_dir(tmp_path / "cache-dmg")
    gated = _views(tmp_path / "cache-dmg")
    p = write(_one_member(cfg, tmp_path, "dmg"), "plain-dmg.yaml")
    plan = build_plan(load_pipeline(p))
    precisions = {"b": SimpleNamespace(ran_in="fp32", note="")}
    import shutil

    real = shutil.disk_usage
    try:
        shutil.disk_usage = lambda path: real(path)._replace(free=0)
        why = space_short(plan, precisions, 2)
    finally:
        shutil.disk_usage = real
    assert why is not None and "need" in why  # 7 gated views to write again, though the entry has them complete
    for k in (0, 1):
        kaggle_tta.infer(p, share=(k, 2), progress=False)
    (shard,) = [s for s in (d / "shards").iterdir() if s.name.startswith("000000000-")]
    f = shard / "hflip.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    m = plan.members[0]
    entry = CacheEntry(plan.cache_root, m.name, m.fingerprint("fp32"), m.inputs)
    done = assemble(entry, [v.name for v in m.views], len(plan.testset), plan.testset.ids)
    assert "hflip" not in done.views and [v for _, _, v, _ in done.damaged] == ["hflip"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert "held" in manifest["views"]["hflip"] and manifest["views"]["_held_hflip"]["status"] == "complete"
    assert np.array_equal(np.load(d / "hflip.npy"), gated["hflip"]) and (d / "_held_hflip.npy").is_file()
    assert "held" not in manifest["views"]["vflip"]  # the others were assembled plain


def test_a_share_reads_its_first_view_from_shards_of_another_split(plain_run, tmp_path):
    """Two shares of the first view alone (tta: [identity]), then three adaptive shares: each
    gates its rows on the first view those other shards hold (it computes none of it), and the
    assembled cache equals one adaptive process's (the identity rows forwarded in other
    chunks: within TOL; the rows each gated view holds: the same)."""
    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    first = _fixed(_one_member(cfg, tmp_path, "el"))
    first["members"][0]["tta"] = ["identity"]
    p1 = write(first, "first.yaml")
    for k in (0, 1):
        kaggle_tta.infer(p1, share=(k, 2), progress=False)
    p = write(_fixed(_one_member(cfg, tmp_path, "el", confidence=t)), "el.yaml")
    for k in range(3):
        st = kaggle_tta.infer(p, share=(k, 3), progress=False)
        assert "identity" not in st.members["b"].views_computed, st
    kaggle_tta.run(p, progress=False)
    kaggle_tta.run(write(_fixed(_one_member(cfg, tmp_path, "ref", confidence=t)), "ref.yaml"), progress=False)
    a, b = _entry_files(tmp_path / "cache-ref"), _entry_files(tmp_path / "cache-el")
    assert a.keys() == b.keys()
    import io

    for k in a:
        if k.startswith("_held_"):
            assert a[k] == b[k], k
        elif k != "states":
            np.testing.assert_allclose(
                np.load(io.BytesIO(b[k])), np.load(io.BytesIO(a[k])), rtol=0, atol=TOL, err_msg=k
            )


def test_shares_of_two_gates_are_never_joined(plain_run, tmp_path):
    """Share 0 of 2 under one gate (its rank finished; the other was killed), then both shares
    under a tighter gate: share 0 computes its gated views again (the old shard holds another
    gate's rows), and the run assembles one gate's rows, computing nothing: equal to one
    process under the tighter gate."""
    write, cfg, plain = plain_run
    s = scores(plain["identity"], "softmax", "confidence")
    loose, tight = float(np.quantile(s, 0.75)), float(np.quantile(s, 0.25))
    kaggle_tta.infer(
        write(_fixed(_one_member(cfg, tmp_path, "two", confidence=loose)), "loose.yaml"), share=(0, 2), progress=False
    )
    p = write(_fixed(_one_member(cfg, tmp_path, "two", confidence=tight)), "tight.yaml")
    again = kaggle_tta.infer(p, share=(0, 2), progress=False)
    assert set(again.members["b"].views_computed) == set(D4[1:]), again
    kaggle_tta.infer(p, share=(1, 2), progress=False)
    assert kaggle_tta.run(p, progress=False).stats.rows_computed == 0
    kaggle_tta.run(write(_fixed(_one_member(cfg, tmp_path, "ref2", confidence=tight)), "ref2.yaml"), progress=False)
    a, b = _entry_files(tmp_path / "cache-ref2"), _entry_files(tmp_path / "cache-two")
    for k in a:
        assert a[k] == b[k], k


def test_a_gated_view_whose_mask_is_damaged_is_replaced_by_its_shares(plain_run, tmp_path, capsys):
    """A gated view's row mask damaged (cache verify marks it): shares under the same gate
    compute the view, and the assembly puts their rows and mask in its place (it is not
    'complete' without its mask), computing nothing more."""
    from kaggle_tta.cli import main

    write, cfg, plain = plain_run
    t = float(np.median(scores(plain["identity"], "softmax", "confidence")))
    p = write(_fixed(_one_member(cfg, tmp_path, "mk", confidence=t)), "mk.yaml")
    kaggle_tta.run(p, progress=False)
    before = _entry_files(tmp_path / "cache-mk")
    mask = _entry_dir(tmp_path / "cache-mk") / "_held_vflip.npy"
    raw = bytearray(mask.read_bytes())
    raw[-1] ^= 1
    mask.write_bytes(bytes(raw))
    assert main(["cache", "verify", str(p)]) == 2
    capsys.readouterr()
    shares = [kaggle_tta.infer(p, share=(k, 2), progress=False) for k in (0, 1)]
    assert all(x.members["b"].views_computed == ["vflip"] for x in shares), shares
    assert kaggle_tta.run(p, progress=False).stats.rows_computed == 0
    after = _entry_files(tmp_path / "cache-mk")
    import io

    assert after["_held_vflip.npy"] == before["_held_vflip.npy"]
    np.testing.assert_allclose(
        np.load(io.BytesIO(after["vflip.npy"])), np.load(io.BytesIO(before["vflip.npy"])), rtol=0, atol=TOL
    )  # forwarded alone: other chunks
    assert not (_entry_dir(tmp_path / "cache-mk") / "shards").exists()
