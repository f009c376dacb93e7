"""runtime.compile: members through torch.compile at one chunk shape, checked against eager
fp32 on the first rows, remembered per model and machine; a member that cannot compile, or
disagrees, runs eager with one line.

Most tests compile with a recording backend (the graph dynamo traced, run as it is): what is
tested is ours (the shapes handed to the compiler, the check, the fallbacks, the decision),
not inductor's code generation; one test runs inductor itself on a small model."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import kaggle_tta
from kaggle_tta.engine import compiling

PRE = {"input_size": [3, 40, 40], "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}


def _cfg(pipeline, factory: str, compile_: bool | str, tmp_path, name: str = "c", **runtime) -> dict:
    write, cfg = pipeline
    cfg["members"] = [{"name": "m", "factory": f"helpers:{factory}", "preprocess": dict(PRE), "tta": "d4"}]
    cfg["blends"] = []
    cfg["runtime"].update(precision="fp32", compile=compile_, forward_batch=16, channels_last=False, **runtime)
    cfg["cache"]["dir"] = str(tmp_path / f"cache_{name}")
    cfg["submission"] = {"path": str(tmp_path / f"{name}.csv"), "format": "probs"}
    return cfg


def _run(pipeline, cfg: dict, name: str):
    write, _ = pipeline
    return kaggle_tta.run(write(cfg, f"{name}.yaml"), progress=False)


@pytest.fixture(autouse=True)
def own_store(monkeypatch, tmp_path):
    """Each test starts on a machine that has compiled nothing (its own decisions store)."""
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "tuning"))


@pytest.fixture
def recording(monkeypatch):
    """torch.compile's backend records the shape of every batch of images it is handed (the
    graph's other inputs are the weights) and runs the traced graph."""
    shapes: list[tuple[int, ...]] = []

    def backend(gm, example_inputs):
        shapes.extend(
            tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor) and t.shape[1:] == (3, 40, 40)
        )
        return gm.forward

    monkeypatch.setattr(compiling, "backend", lambda: backend)
    return shapes


def test_compiled_member_runs_one_chunk_shape_and_matches_eager(pipeline, tmp_path, recording, capsys):
    """24 images x 8 views in chunks of 16: the last chunk of each batch is padded, so the
    compiler sees batches of 16 only, and the probabilities equal the eager run's (the traced
    graph runs the same operations: to 1e-6)."""
    eager = _run(pipeline, _cfg(pipeline, "tiny_conv", False, tmp_path, "eager"), "eager")
    res = _run(pipeline, _cfg(pipeline, "tiny_conv", True, tmp_path, "comp"), "comp")
    assert recording and {s[0] for s in recording} == {16}, recording
    m = res.stats.members["m"]
    assert m.compiled and m.compile_note.startswith("compiled in "), m.compile_note
    assert "checked against eager fp32 on " in m.compile_note
    a = pd.read_csv(eager.blend.path).drop(columns="id").to_numpy()
    b = pd.read_csv(res.blend.path).drop(columns="id").to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-6)
    # a second run on other images (another cache) checks nothing again
    recording.clear()
    monkeypatch_check = pytest.MonkeyPatch()
    monkeypatch_check.setattr(compiling, "compare_precision", lambda *a, **k: pytest.fail("checked again"))
    try:
        again = _run(pipeline, _cfg(pipeline, "tiny_conv", True, tmp_path, "again"), "again")
    finally:
        monkeypatch_check.undo()
    assert again.stats.members["m"].compiled and "as before on this machine" in again.stats.members["m"].compile_note
    assert {s[0] for s in recording} <= {16}  # dynamo may reuse the first program (same code, same shapes)


@pytest.mark.parametrize(
    ("factory", "fails", "says"),
    [
        ("tiny_conv", True, "eager: torch.compile failed (BackendCompilerFailed: "),
        ("differs_compiled", False, "eager: the compiled forward disagreed with eager fp32 (top-1 agreed on"),
    ],
)
def test_a_member_that_cannot_compile_runs_eager_with_one_line(
    pipeline, tmp_path, recording, monkeypatch, factory, fails, says
):
    """A compiler that fails (here its backend raises, as where no C++ compiler is found), or
    one whose output disagrees with eager fp32: the member runs eager, with one line."""
    if fails:

        def broken(gm, example_inputs):
            raise RuntimeError("no working C++ compiler found")

        monkeypatch.setattr(compiling, "backend", lambda: broken)
    eager = _run(pipeline, _cfg(pipeline, factory, False, tmp_path, "eager"), "eager")
    res = _run(pipeline, _cfg(pipeline, factory, True, tmp_path, "comp"), "comp")
    m = res.stats.members["m"]
    assert not m.compiled and m.compile_note.startswith(says), m.compile_note
    assert "\n" not in m.compile_note and len(m.compile_note) < 300
    assert pd.read_csv(res.blend.path).equals(pd.read_csv(eager.blend.path))  # eager, as without compile


def test_auto_compiles_only_where_the_forward_repays_the_compile(pipeline, tmp_path, recording, monkeypatch):
    """auto: a run below MIN_INPUTS measures nothing and runs eager; above it, the measured
    eager time against the compile time decides (here a compile priced at 1e9 s, then at 0)."""
    small = _run(pipeline, _cfg(pipeline, "tiny_conv", "auto", tmp_path, "small"), "small")
    assert not small.stats.members["m"].compiled and not small.stats.members["m"].compile_note and not recording
    monkeypatch.setattr(compiling, "MIN_INPUTS", 0)
    monkeypatch.setattr(compiling, "COLD_SECONDS", {"cpu": 1e9})
    dear = _run(pipeline, _cfg(pipeline, "tiny_conv", "auto", tmp_path, "dear"), "dear")
    note = dear.stats.members["m"].compile_note
    assert not dear.stats.members["m"].compiled and note.startswith("eager: compiling (about 1000000000s)"), note
    with monkeypatch.context() as m:  # the eager time is the model's on this machine: not measured again
        m.setattr(compiling, "first_batches", lambda *a, **k: pytest.fail("measured again"))
        again = _run(pipeline, _cfg(pipeline, "tiny_conv", "auto", tmp_path, "dear2"), "dear2")
    assert again.stats.members["m"].compile_note.startswith(note.split(" inputs")[0]), note  # (none ran eager yet)
    monkeypatch.setattr(compiling, "COLD_SECONDS", {"cpu": 0.0})
    cheap = _run(pipeline, _cfg(pipeline, "tiny_conv", "auto", tmp_path, "cheap"), "cheap")
    assert cheap.stats.members["m"].compiled, cheap.stats.members["m"].compile_note


def test_auto_times_the_eager_forward_on_the_stream_and_keeps_its_rows(pipeline, tmp_path, monkeypatch):
    """auto with nothing remembered: the eager time comes from the stream's first chunks (no
    pass of its own over rows decoded again), and where the member stays eager those rows are
    kept: the model sees each of the 24 x 8 inputs once; the time is remembered for the next run."""
    import helpers

    monkeypatch.setattr(compiling, "MIN_INPUTS", 0)
    monkeypatch.setattr(compiling, "COLD_SECONDS", {"cpu": 1e9})
    monkeypatch.setattr(compiling, "first_batches", lambda *a, **k: pytest.fail("a pass of its own"))
    cfg = _cfg(pipeline, "input_counter", "auto", tmp_path, "dear")
    helpers.InputCounter.seen = 0
    res = _run(pipeline, cfg, "dear")
    note = res.stats.members["m"].compile_note
    assert note.startswith("eager: compiling (about 1000000000s) would not repay itself on 192 inputs"), note
    assert helpers.InputCounter.seen == 24 * 8, helpers.InputCounter.seen
    again = _run(pipeline, _cfg(pipeline, "input_counter", "auto", tmp_path, "dear2"), "dear2")
    again_note = again.stats.members["m"].compile_note  # decided from the remembered time, before streaming:
    assert again_note.startswith(note.split(" of which")[0] + " (about"), again_note  # nothing ran eager yet
    assert helpers.InputCounter.seen == 2 * 24 * 8, helpers.InputCounter.seen


def test_auto_counts_the_inputs_eager_keeps_against_the_compile(monkeypatch):
    """Decided on the stream's first chunks: compiling computes the rows on trial again, so the
    inputs staying eager keeps count against it. 1 000 inputs at 10 ms eager, 5 ms compiled
    (5 s saved) repay a 4 s compile; with 200 of them already run eager (2 s more) they do not."""
    plan = SimpleNamespace(cfg=SimpleNamespace(runtime=SimpleNamespace(compile="auto")))
    rec = {"eager_s": 0.01, "compiled_s": 0.005, "compile_s": 4.0}

    def compiles(*a, **k):
        raise LookupError("compiles")

    monkeypatch.setattr(compiling, "_compile_and_check", compiles)
    choose = functools.partial(compiling._choose, plan, None, None, torch.device("cpu"), 0, 1000, "k", rec, [0])
    with pytest.raises(LookupError):
        choose()
    note = choose(kept=200).note
    assert note.startswith("eager: compiling (about 4s) would not repay itself on 1000 inputs of which 200"), note
    assert note.endswith("(about 3s saved)"), note


def test_inductor_compiles_a_small_model_and_caches_the_program(pipeline, tmp_path, monkeypatch):
    """The real compiler (inductor, C++ on the CPU): predictions within 1e-5 of eager, the
    program written under the decisions store (where a later run finds it)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    eager = _run(pipeline, _cfg(pipeline, "tiny_conv", False, tmp_path, "eager"), "eager")
    res = _run(pipeline, _cfg(pipeline, "tiny_conv", True, tmp_path, "ind"), "ind")
    assert res.stats.members["m"].compiled, res.stats.members["m"].compile_note
    a = pd.read_csv(eager.blend.path).drop(columns="id").to_numpy()
    b = pd.read_csv(res.blend.path).drop(columns="id").to_numpy()
    np.testing.assert_allclose(b, a, atol=1e-5)
    store = compiling.decisions.home() / "inductor"
    assert store.is_dir() and any(store.rglob("*")), store


def test_a_compile_that_fails_later_goes_on_eager(pipeline, tmp_path, recording, monkeypatch):
    """Checked and remembered on this machine, then the compiler breaks (a toolchain removed):
    the next run goes on eager at its first chunk, with one line, and the same predictions."""
    first = _run(pipeline, _cfg(pipeline, "tiny_conv", True, tmp_path, "first"), "first")
    assert first.stats.members["m"].compiled
    torch._dynamo.reset()  # a new process: nothing compiled in memory

    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(compiling, "backend", lambda: broken)
    later = _run(pipeline, _cfg(pipeline, "tiny_conv", True, tmp_path, "later"), "later")
    m = later.stats.members["m"]
    assert not m.compiled and m.compile_note.startswith("eager: torch.compile failed (BackendCompilerFailed"), m
    a = pd.read_csv(first.blend.path).drop(columns="id").to_numpy()
    np.testing.assert_allclose(pd.read_csv(later.blend.path).drop(columns="id").to_numpy(), a, atol=1e-6)


def test_a_store_moves_to_a_machine_of_its_kind(tmp_path, monkeypatch):
    """export writes the store (records and inductor's programs); adopt takes in what the
    store here lacks and keeps its own record where both have one."""
    from kaggle_tta.exec import decisions

    decisions.remember_verdict(tmp_path / "c", "a", {"ran_in": "compiled", "compile_s": 20.0})
    (decisions.home() / decisions.INDUCTOR / "x").mkdir(parents=True)
    (decisions.home() / decisions.INDUCTOR / "x" / "program").write_text("compiled")
    assert decisions.export(tmp_path / "out") == 1
    monkeypatch.setenv("KAGGLE_TTA_TUNING_DIR", str(tmp_path / "next-machine"))
    decisions.remember_verdict(tmp_path / "d", "a", {"ran_in": "eager", "note": "its own"})
    (tmp_path / "out" / "decisions.json").write_text('{"a": {"ran_in": "compiled"}, "b": {"ran_in": "fp32"}}')
    assert decisions.adopt(tmp_path / "out") == 1
    assert decisions.recall_verdict(tmp_path / "e", "a") == {"ran_in": "eager", "note": "its own"}
    assert decisions.recall_verdict(tmp_path / "e", "b") == {"ran_in": "fp32"}
    assert (tmp_path / "next-machine" / decisions.INDUCTOR / "x" / "program").read_text() == "compiled"
