"""Every rank, every node, one cache: torchrun (torch.distributed.run, gloo on the CPU) on
127.0.0.1. Caches are compared file by file (every .npy and ids.json) with one process's,
at fp32, one torch thread per process (convolutions on the CPU split their sums by thread
count, so bit-identity holds between equal thread counts) and a fixed memory layout."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kaggle_tta import build_plan, load_pipeline, run
from kaggle_tta.cli import main
from kaggle_tta.dist import Ranks

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXED = {"precision": "fp32", "threads": 1, "channels_last": False, "forward_batch": 8, "batch_size": 4, "workers": 0, "device": "cpu"}


@pytest.fixture(autouse=True)
def _keep_threads():
    """In-process reference runs set torch's threads to 1: put them back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _files(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*/*/*")) if p.suffix == ".npy" or p.name == "ids.json"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def _started(*cmds: list[str], env: dict[str, str] | None = None):
    """The commands, each started in a session of its own; every process of each session
    (the launcher and its ranks) is SIGKILLed on the way out, so that a failing test never
    leaves ranks running."""
    procs = [subprocess.Popen(c, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) for c in cmds]
    try:
        yield procs
    finally:
        for q in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(q.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                q.communicate(timeout=10)


def _finish(*cmds: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """The commands run side by side (two agents as two nodes) to their end."""
    with _started(*cmds, env=env) as procs:
        outs = [q.communicate(timeout=timeout) for q in procs]
    return [subprocess.CompletedProcess(c, q.returncode, out, err) for c, q, (out, err) in zip(cmds, procs, outs)]


def _torchrun(args: list[str], pipeline: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(pipeline), "-q", *extra]
    return _finish(cmd, timeout=timeout)[0]


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classification(cfg: dict, tmp: Path, name: str) -> Path:
    c = copy.deepcopy(cfg)
    c["runtime"] = dict(FIXED)
    (tmp / name).mkdir(exist_ok=True)
    c["cache"] = {"dir": str(tmp / name / "cache")}
    c["submission"]["path"] = str(tmp / name / "sub.csv")
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(c, sort_keys=False))
    return p


def _example(task: str, demo_images: Path, tmp: Path, name: str) -> Path:
    """examples/<task>.yaml on the demo set (test_cache_trust's), with this file's runtime."""
    from test_cache_trust import _example as trust_example

    (tmp / f"{name}-src").mkdir()
    cfg = yaml.safe_load(trust_example(task, demo_images, tmp / f"{name}-src", tmp / name / "cache").read_text())
    return _classification(cfg, tmp, name)


def _pipeline_for(task: str, pipeline, demo_images: Path, tmp: Path, name: str) -> Path:
    if task == "classification":
        return _classification(pipeline[1], tmp, name)
    return _example(task, demo_images, tmp, name)


def _same(reference: Path, other: Path) -> None:
    """Caches and submissions of two pipelines written by _classification/_example."""
    a, b = _files(reference.parent / reference.stem / "cache"), _files(other.parent / other.stem / "cache")
    assert a and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert not list((other.parent / other.stem / "cache").glob("*/*/shards")), "shards are removed once assembled"
    assert (reference.parent / reference.stem / "sub.csv").read_bytes() == (other.parent / other.stem / "sub.csv").read_bytes()


# ---- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 23, 24, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("unit", [1, 4, 64])
def test_shares_are_contiguous_whole_batches_covering_every_row_once(n, world, unit):
    shares = [Ranks(r, world, r, world).share(n, unit) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(shares[k][1] == shares[k + 1][0] for k in range(world - 1))  # contiguous, no row twice
    assert all(lo % unit == 0 for lo, _ in shares)  # whole loader batches
    blocks = [-(-(hi - lo) // unit) for lo, hi in shares]
    assert max(blocks) - min(blocks) <= 1


# ---- 2 and 3 ranks, all three tasks ---------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_two_and_three_ranks_equal_one_process(task, pipeline, demo_images, tmp_path):
    single = _pipeline_for(task, pipeline, demo_images, tmp_path, "single")
    run(single, progress=False)
    for n in (2, 3):
        p = _pipeline_for(task, pipeline, demo_images, tmp_path, f"ranks{n}")
        done = _torchrun(["--standalone", "--nproc_per_node", str(n)], p)
        _ok(done)
        _same(single, p)
        # rank 0 names every rank; the others wrote one line each and did not blend
        assert done.stdout.count("wrote ") == 1
        assert "ranks: 0 rows 0-" in done.stdout and f"; {n - 1} rows " in done.stdout
        assert sum(f"rank {k}/{n} on cpu: rows" in done.stdout for k in range(1, n)) == n - 1


# ---- a killed rank, two nodes, devices: 2 ----------------------------------------------------


def _slow(pipeline, tmp: Path, name: str, delay: float) -> Path:
    cfg = copy.deepcopy(pipeline[1])
    cfg["members"] = [{"name": "slow", "factory": "rank_models:slow_marked", "kwargs": {"marks": str(tmp / "marks"), "delay": delay}, "preprocess": {"input_size": [3, 32, 32]}, "tta": "hflip"}]
    cfg["blends"] = []
    return _classification(cfg, tmp, name)


def test_a_rank_killed_mid_run_restarts_and_completes_identically(pipeline, tmp_path):
    single = _slow(pipeline, tmp_path, "single", 0.4)  # the delay is a kwarg: in the fingerprint
    run(single, progress=False)
    p = _slow(pipeline, tmp_path, "killed", 0.4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "kaggle_tta", "run", str(p), "-q"]
    shard = tmp_path / "killed" / "cache"
    deadline, killed = time.time() + 120, None
    with _started(cmd) as (proc,):
        while time.time() < deadline and killed is None and proc.poll() is None:
            for man in shard.glob("slow/*/shards/000000012-*/manifest.json"):
                try:
                    views = json.loads(man.read_text())["views"]
                except (OSError, ValueError):
                    continue
                if any(st.get("rows_done", 0) >= 4 for st in views.values()):  # a batch committed, more to come
                    mark = next((tmp_path / "marks").glob("1.0.*"))
                    killed = int(mark.name.split(".")[2])
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=180)
    assert killed is not None, "rank 1 never committed a batch"
    assert proc.returncode == 0, err[-3000:]
    assert list((tmp_path / "marks").glob("1.1.*")), "the group was restarted"
    # after the restart rank 1 computed only the rows its shard lacked
    line = next(ln for ln in out.splitlines() if "rank 1/2 on cpu" in ln)
    assert int(line.split(", ")[1].split(" ")[0]) < 12, line
    _same(single, p)


def test_a_rank_dying_before_it_joins_restarts_and_completes_identically(pipeline, tmp_path):
    """Rank 1 of the first round exits once rank 0 is in the store, before it joins itself
    (tests/rank_models.py run as the script): the next round names itself afresh (no count of
    arrivals left off by one) and completes."""
    single = _slow(pipeline, tmp_path, "single", 0.0)
    run(single, progress=False)
    p = _slow(pipeline, tmp_path, "died", 0.0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", str(TESTS / "rank_models.py"), "run", str(p), "-q"]
    (done,) = _finish(cmd, env={**_env(), "KAGGLE_TTA_TEST_DIE_BEFORE_JOIN": "1"}, timeout=120)
    _ok(done)
    ranked = sorted(m.name.split(".")[:2] for m in (tmp_path / "marks").iterdir() if not m.name.startswith("x."))  # x: the single run's
    assert ranked == [["0", "1"], ["1", "1"]], "the second round ran the model, the first none"
    _same(single, p)


def test_two_agents_as_two_nodes_complete_identically(pipeline, demo_images, tmp_path):
    single = _pipeline_for("segmentation", pipeline, demo_images, tmp_path, "single")
    run(single, progress=False)
    p = _pipeline_for("segmentation", pipeline, demo_images, tmp_path, "nodes")
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "two-nodes"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(p), "-q"]
    done = _finish(cmd, cmd)
    for d in done:
        _ok(d)
    assert sum("ranks: 0 rows 0-12" in d.stdout for d in done) == 1
    _same(single, p)


def test_nodes_without_a_shared_cache_are_refused_before_any_forward(pipeline, tmp_path):
    p = _slow(pipeline, tmp_path, "apart", 0.0)
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "apart"]
    cmds = [[sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(p), "-q", "--set", f"cache.dir={tmp_path / f'node{k}'}"] for k in range(2)]  # each "machine" its own cache.dir
    done = _finish(*cmds)
    assert all(d.returncode != 0 for d in done)
    assert all("do not see one folder" in d.stderr and "cache merge" in d.stderr for d in done), done[0].stderr[-2000:]
    assert not (tmp_path / "marks").exists(), "no model ran"


def test_runtime_devices_2_under_precision_auto_starts_two_ranks_and_completes_identically(pipeline, tmp_path):
    """precision auto: bf16 where the CPU has it natively (rank 0 checks it against fp32 for
    every rank), fp32 elsewhere. Both caches hold complete fp32 entries first: under a reduced
    auto they are not this run's, so the ranks start (and compute what one process does)."""
    from kaggle_tta.api import _all_cached
    from kaggle_tta.plan import resolve_precision

    auto = ["runtime.precision=auto"]
    reduced = resolve_precision("auto", torch.device("cpu")) != "fp32"
    single = _classification(pipeline[1], tmp_path, "single")
    p = _classification(pipeline[1], tmp_path, "devices")
    for q in (single, p):
        run(q, progress=False)  # fp32
    assert _all_cached(build_plan(load_pipeline(single, auto))) is not reduced
    run(single, auto, progress=False)
    assert _all_cached(build_plan(load_pipeline(single, auto)))
    cmd = [sys.executable, "-m", "kaggle_tta", "run", str(p), "-q", "--set", "runtime.devices=2", "--set", auto[0]]
    (done,) = _finish(cmd)
    _ok(done)
    if reduced:
        assert "ranks: 0 rows 0-12" in done.stdout and "; 1 rows 12-24" in done.stdout, done.stdout
    else:
        assert "no model was run" in done.stdout and "ranks:" not in done.stdout, done.stdout
    _same(single, p)
    (again,) = _finish(cmd)
    _ok(again)
    assert "no model was run" in again.stdout and "ranks:" not in again.stdout  # all cached: no ranks started


def test_ctrl_c_under_runtime_devices_stops_every_rank_with_one_line(pipeline, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group (the launching process and its
    ranks; the agent forwards it to the ranks once more). Exit 130, one line, no traceback."""
    p = _slow(pipeline, tmp_path, "interrupted", 0.3)
    cmd = [sys.executable, "-m", "kaggle_tta", "run", str(p), "-q", "--set", "runtime.devices=2"]
    with _started(cmd) as (proc,):
        deadline = time.time() + 120
        while time.time() < deadline and len(list((tmp_path / "marks").glob("*"))) < 2 and proc.poll() is None:
            time.sleep(0.1)  # both ranks are forwarding
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "kaggle-tta: interrupted; completed batches are in the cache — rerun to resume", err[-3000:]


# ---- in one process: other splits, other machines, other commands ---------------------------


def _share(plan, lo: int, hi: int):
    from kaggle_tta.engine import choose_precisions
    from kaggle_tta.ranked import run_share

    precisions = choose_precisions(plan, torch.device("cpu"), "fp32")
    return run_share(plan, torch.device("cpu"), precisions, lo, hi), precisions


def test_a_changed_split_uses_the_shards_of_the_old_one(pipeline, tmp_path):
    """An elastic group that shrank or grew: 2 ranks, of which one finished (rows 0-12),
    then 3 ranks. The new rank 0's rows are all in the old shard: it computes none."""
    from kaggle_tta.ranked import assemble_entries

    single = _classification(pipeline[1], tmp_path, "single")
    run(single, progress=False)
    p = _classification(pipeline[1], tmp_path, "elastic")
    plan = build_plan(load_pipeline(p))
    first, _ = _share(plan, *Ranks(0, 2, 0, 2).share(24, 4))
    assert first.rows_computed == 12
    computed = []
    for r in range(3):
        stats, precisions = _share(plan, *Ranks(r, 3, r, 3).share(24, 4))
        computed.append(stats.rows_computed)
    assert computed == [0, 8, 8]
    assert assemble_entries(plan, precisions).made == 10  # 2 + 8 views
    for m in plan.members:  # the assembly records its pipeline as the entries' user (cache prune keeps them)
        assert str(p) in json.loads((plan.cache_root / m.name / m.fingerprint("fp32") / "manifest.json").read_text())["used_by"]
    main(["blend", str(p)])
    _same(single, p)


def test_machines_without_a_shared_disk_join_with_cache_merge(pipeline, demo_images, tmp_path, capsys):
    single = _pipeline_for("detection", pipeline, demo_images, tmp_path, "single")
    run(single, progress=False)
    p = _pipeline_for("detection", pipeline, demo_images, tmp_path, "merged")
    other = tmp_path / "machine1"
    assert main(["infer", str(p), "-q", "--share", "0/2"]) == 0
    assert main(["infer", str(p), "-q", "--share", "1/2", "--set", f"cache.dir={other}"]) == 0
    assert main(["blend", str(p)]) == 2  # half the rows: refused, not half a submission
    assert main(["cache", "merge", str(p), str(other)]) == 0
    assert "assembled" in capsys.readouterr().out
    assert main(["blend", str(p)]) == 0
    _same(single, p)
    assert main(["infer", str(p), "--share", "2/2"]) == 2
    assert "--share 2/2" in capsys.readouterr().err


def test_under_torchrun_only_rank_0_blends_and_runs_cache_commands(pipeline, tmp_path, monkeypatch):
    p = _classification(pipeline[1], tmp_path, "ranked")
    run(p, progress=False)
    sub = tmp_path / "ranked" / "sub.csv"
    sub.unlink()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["blend", str(p)]) == 0
    assert main(["cache", "prune", str(p), "--force"]) == 0
    assert not sub.exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["blend", str(p)]) == 0 and sub.exists()


def test_ranks_without_a_launcher_are_one_line(pipeline, tmp_path, monkeypatch, capsys):
    """RANK and WORLD_SIZE set by hand, no MASTER_ADDR: one line naming the fix, no traceback."""
    p = _classification(pipeline[1], tmp_path, "unlaunched")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["run", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASTER_ADDR and MASTER_PORT are not" in err[0] and "torchrun" in err[0], err


def test_a_device_named_for_one_gpu_is_refused_with_ranks():
    from kaggle_tta.dist import device_for
    from kaggle_tta.errors import ConfigError

    with pytest.raises(ConfigError, match="names one GPU"):
        device_for("cuda:1", Ranks(0, 2, 0, 2))


def _corrupt_last(pipeline, tmp: Path, name: str) -> Path:
    """The classification pipeline on a copy of the demo set whose last image is not an image
    (found by the loader, in the last rank's share; the listing does not read the images)."""
    import shutil

    images = tmp / f"{name}-images"
    shutil.copytree(Path(pipeline[1]["data"]["folder"]), images)
    sorted(images.glob("*.png"))[-1].write_bytes(b"not a png")
    cfg = copy.deepcopy(pipeline[1])
    cfg["data"]["folder"] = str(images)
    cfg["data"]["labels"] = {"path": str(images / "labels.csv")}
    return _classification(cfg, tmp, name)


def test_a_rank_failing_on_another_node_stops_every_rank_with_one_line(pipeline, tmp_path):
    """Two agents (two nodes): rank 1's share holds an image that cannot be decoded. Rank 1
    fails; rank 0, on the other agent, stops within seconds (not at a barrier after 48 h)
    naming rank 1's error, and neither prints a traceback of ours."""
    p = _corrupt_last(pipeline, tmp_path, "bad")
    args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "bad"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(p), "-q"]
    done = _finish(cmd, cmd, timeout=120)
    assert all(d.returncode != 0 for d in done), [d.stderr[-2000:] for d in done]
    errs = "\n".join(d.stderr for d in done)
    assert "kaggle-tta: rank 1/2: error: " in errs and "img_00023" in errs, errs[-3000:]
    stopped = [ln for ln in errs.splitlines() if ln.startswith("kaggle-tta: rank 0/2: error: ")]
    assert len(stopped) == 1 and "rank 1/2 on " in stopped[0] and "failed: " in stopped[0] and "img_00023" in stopped[0], errs[-3000:]
    assert "kaggle_tta/" not in errs, errs[-3000:]  # no traceback through our code
