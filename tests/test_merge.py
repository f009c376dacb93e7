"""Reducers and blend methods against direct numpy formulas; the DAG; the cache contract."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_tta.cache import CacheEntry
from kaggle_tta.config.errors import CacheError, ConfigError
from kaggle_tta.ops.merge import Prediction, activate, blend, rank_columns, reduce_views

RNG = np.random.default_rng(0)
VIEWS = [RNG.normal(0, 2, (50, 6)).astype(np.float32) for _ in range(5)]


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("act,f", [("softmax", softmax), ("sigmoid", sigmoid)])
def test_view_reducers_match_their_formulas(act, f):
    probs = [f(v) for v in VIEWS]
    cases = {
        "mean": np.mean(VIEWS, axis=0),
        "mean_prob": np.mean(probs, axis=0),
        "max": np.max(probs, axis=0),
    }
    geo = np.exp(np.mean(np.log(probs), axis=0))
    ts = np.mean(np.sqrt(probs), axis=0)
    if act == "softmax":
        geo, ts = geo / geo.sum(1, keepdims=True), ts / ts.sum(1, keepdims=True)
        # the geometric mean of softmax probabilities is the softmax of the mean logits
        np.testing.assert_allclose(geo, softmax(np.mean(VIEWS, axis=0)), atol=1e-5)
    cases.update(geomean=geo, tsharpen=ts)
    for name, expected in cases.items():
        np.testing.assert_allclose(reduce_views(name, iter(VIEWS), act).values, expected, atol=1e-5, err_msg=name)


def test_blend_methods():
    a = Prediction(VIEWS[0], "logits")
    b = Prediction(softmax(VIEWS[1]), "probs")
    pa, pb = softmax(VIEWS[0]), softmax(VIEWS[1])
    np.testing.assert_allclose(blend("mean", [a, b], [3, 1]).values, 0.75 * pa + 0.25 * pb, atol=1e-6)
    np.testing.assert_allclose(
        blend("power_mean", [a, b], None, power=2).values, np.sqrt((pa**2 + pb**2) / 2), atol=1e-6
    )
    c = Prediction(VIEWS[2], "logits")
    out = blend("mean", [a, c], [1, 1], space="logits")
    assert out.kind == "logits"
    np.testing.assert_allclose(out.values, (VIEWS[0] + VIEWS[2]) / 2, atol=1e-6)
    # rank_mean ranks each input's probabilities (its own activation), in one stated space
    r = blend("rank_mean", [a, b], [1, 1])
    assert r.kind == "scores"
    np.testing.assert_allclose(r.values, (rank_columns(pa) + rank_columns(pb)) / 2, atol=1e-6)
    ranks = rank_columns(np.array([[3.0], [1.0], [2.0]]))
    np.testing.assert_allclose(ranks[:, 0], [1.0, 0.0, 0.5])
    with pytest.raises(ConfigError, match="unknown blend method 'avg'"):
        blend("avg", [a], None)
    with pytest.raises(ConfigError, match="space: logits needs every input to be logits"):
        blend("mean", [a, b], None, space="logits")
    s = Prediction(VIEWS[0], "logits", "sigmoid")  # a sigmoid member's logits blend as its probabilities
    np.testing.assert_allclose(
        blend("mean", [s, b], [1, 1]).values, 0.5 / (1 + np.exp(-VIEWS[0])) + 0.5 * pb, atol=1e-6
    )


def test_activate_is_stable_for_huge_logits():
    z = np.array([[1000.0, -1000.0, 0.0]], dtype=np.float32)
    assert np.isfinite(activate(z, "softmax")).all()
    assert np.isfinite(activate(z, "sigmoid")).all()


def test_cache_entry_hides_partial_views_and_resumes(tmp_path):
    e = CacheEntry(tmp_path, "m", "fp-fp32")
    e.write_ids(["a", "b", "c", "d"])
    arr, start = e.open_for_write("hflip", (4, 3), "float32")
    assert start == 0
    arr[:2] = 1.0
    e.record("hflip", 2, 0.5)
    e.commit()
    assert not e.is_complete("hflip") and not (tmp_path / "m/fp-fp32/hflip.npy").exists()
    with pytest.raises(CacheError):
        e.read("hflip")
    # A new process sees the committed rows and continues from there.
    e2 = CacheEntry(tmp_path, "m", "fp-fp32")
    arr2, start2 = e2.open_for_write("hflip", (4, 3), "float32")
    assert start2 == 2 and (arr2[:2] == 1.0).all()
    arr2[2:] = 2.0
    e2.record("hflip", 4, 0.5)
    e2.commit()
    assert e2.is_complete("hflip")
    np.testing.assert_array_equal(e2.read("hflip"), [[1] * 3, [1] * 3, [2] * 3, [2] * 3])
    assert e2.view_state("hflip")["seconds"] == 1.0
    with pytest.raises(CacheError, match="ids differ"):
        e2.write_ids(["a", "b", "c", "x"])
    # A torn manifest is reported, not trusted.
    (tmp_path / "m/fp-fp32/manifest.json").write_text("{")
    with pytest.raises(CacheError, match="damaged manifest"):
        CacheEntry(tmp_path, "m", "fp-fp32")
