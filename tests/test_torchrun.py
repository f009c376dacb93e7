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

import numpy as np
import pytest
import torch
import yaml

from kaggle_tta import build_plan, load_pipeline, run
from kaggle_tta.cli import main
from kaggle_tta.dist.ranks import Ranks

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FIXED = {
    "precision": "fp32",
    "threads": 1,
    "channels_last": False,
    "forward_batch": 8,
    "batch_size": 4,
    "workers": 0,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def _keep_threads():
    """In-process reference runs set torch's threads to 1: put them back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _files(cache: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(cache)): p.read_bytes()
        for p in sorted(cache.glob("*/*/*"))
        if p.suffix == ".npy" or p.name == "ids.json"
    }


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def _started(*cmds: list[str], env: dict[str, str] | None = None):
    """The commands, each started in a session of its own; every process of each session
    (the launcher and its ranks) is SIGKILLed on the way out, so that a failing test never
    leaves ranks running."""
    procs = [
        subprocess.Popen(
            c,
            cwd=REPO,
            env=env or _env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for c in cmds
    ]
    try:
        yield procs
    finally:
        _kill_groups(procs)


def _kill_groups(procs) -> None:
    """Every process group started (each in its own session): none left running."""
    for q in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(q.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            q.communicate(timeout=10)


def _finish(
    *cmds: list[str], timeout: float = 240, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess]:
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
    assert (reference.parent / reference.stem / "sub.csv").read_bytes() == (
        other.parent / other.stem / "sub.csv"
    ).read_bytes()


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


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_two_and_three_ranks_equal_one_process(task, pipeline, demo_images, tmp_path):
    """Detection on 2 ranks, classification on 3 (shares of unequal size): how rows are shared
    and assembled is the same code for every task, so more launches per task repeated it at
    10-40 s each (segmentation on 2 ranks, identical to one process: the two-node test below;
    classification on 2: the tests of a rank killed or dying)."""
    single = _pipeline_for(task, pipeline, demo_images, tmp_path, "single")
    run(single, progress=False)
    for n in (3,) if task == "classification" else (2,):
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
    cfg["members"] = [
        {
            "name": "slow",
            "factory": "rank_models:slow_marked",
            "kwargs": {"marks": str(tmp / "marks"), "delay": delay},
            "preprocess": {"input_size": [3, 32, 32]},
            "tta": "hflip",
        }
    ]
    cfg["blends"] = []
    return _classification(cfg, tmp, name)


def test_a_rank_killed_mid_run_restarts_and_completes_identically(pipeline, tmp_path):
    single = _slow(pipeline, tmp_path, "single", 0.4)  # the delay is a kwarg: in the fingerprint
    run(single, progress=False)
    p = _slow(pipeline, tmp_path, "killed", 0.4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "kaggle_tta",
        "run",
        str(p),
        "-q",
    ]
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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        str(TESTS / "rank_models.py"),
        "run",
        str(p),
        "-q",
    ]
    (done,) = _finish(cmd, env={**_env(), "KAGGLE_TTA_TEST_DIE_BEFORE_JOIN": "1"}, timeout=120)
    _ok(done)
    ranked = sorted(
        m.name.split(".")[:2] for m in (tmp_path / "marks").iterdir() if not m.name.startswith("x.")
    )  # x: the single run's
    assert ranked == [["0", "1"], ["1", "1"]], "the second round ran the model, the first none"
    _same(single, p)


def test_two_agents_as_two_nodes_complete_identically(pipeline, demo_images, tmp_path):
    single = _pipeline_for("segmentation", pipeline, demo_images, tmp_path, "single")
    run(single, progress=False)
    p = _pipeline_for("segmentation", pipeline, demo_images, tmp_path, "nodes")
    args = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        "two-nodes",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(p), "-q"]
    done = _finish(cmd, cmd)
    for d in done:
        _ok(d)
    assert sum("ranks: 0 rows 0-12" in d.stdout for d in done) == 1
    _same(single, p)


def test_nodes_without_a_shared_cache_are_refused_before_any_forward(pipeline, tmp_path):
    p = _slow(pipeline, tmp_path, "apart", 0.0)
    args = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        "apart",
    ]
    cmds = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *args,
            "-m",
            "kaggle_tta",
            "run",
            str(p),
            "-q",
            "--set",
            f"cache.dir={tmp_path / f'node{k}'}",
        ]
        for k in range(2)
    ]  # each "machine" its own cache.dir
    done = _finish(*cmds)
    assert all(d.returncode != 0 for d in done)
    assert all("do not see one folder" in d.stderr and "cache merge" in d.stderr for d in done), done[0].stderr[-2000:]
    assert not (tmp_path / "marks").exists(), "no model ran"


def test_runtime_devices_2_under_precision_auto_starts_two_ranks_and_completes_identically(pipeline, tmp_path):
    """precision auto: bf16 where the CPU has it natively, fp32 elsewhere; on 24 images the
    bf16 check cannot repay itself (engine.precision.CHECK_REPAY), so auto runs fp32 on both
    kinds of CPU. Both caches hold complete fp32 entries first: before a run under auto has
    said so, a reduced auto does not take them as its own; once it has (the fp32 entry records
    why), ranks reuse them and start nothing."""
    from kaggle_tta.engine.device import resolve_precision
    from kaggle_tta.engine.pending import all_cached as _all_cached

    auto = ["runtime.precision=auto"]
    reduced = resolve_precision("auto", torch.device("cpu")) != "fp32"
    single = _slow(pipeline, tmp_path, "single", 0.0)  # a factory member: the launching process imports no timm
    p = _slow(pipeline, tmp_path, "devices", 0.0)
    for q in (single, p):
        run(q, progress=False)  # fp32
    assert _all_cached(build_plan(load_pipeline(single, auto))) is not reduced
    run(single, auto, progress=False)
    assert _all_cached(build_plan(load_pipeline(single, auto)))
    cmd = [sys.executable, "-m", "kaggle_tta", "run", str(p), "-q", "--set", "runtime.devices=2", "--set", auto[0]]
    (done,) = _finish(cmd)
    _ok(done)
    assert "no model was run" in done.stdout and "ranks:" not in done.stdout, done.stdout
    _same(single, p)
    (again,) = _finish(cmd)
    _ok(again)
    assert "no model was run" in again.stdout and "ranks:" not in again.stdout  # all cached: no ranks started


def test_ctrl_c_under_runtime_devices_stops_every_rank_with_one_line(pipeline, tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group (the launching process and its
    ranks; the agent forwards it to the ranks once more). Exit 130, one line, no traceback."""
    p = _slow(pipeline, tmp_path, "interrupted", 0.8)
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
    assert (
        err.strip().splitlines()[-1] == "kaggle-tta: interrupted; completed batches are in the cache — rerun to resume"
    ), err[-3000:]


# ---- in one process: other splits, other machines, other commands ---------------------------


def _share(plan, lo: int, hi: int):
    from kaggle_tta.engine.precision import choose_precisions
    from kaggle_tta.engine.shares import run_share

    precisions = choose_precisions(plan, torch.device("cpu"), "fp32")
    return run_share(plan, torch.device("cpu"), precisions, lo, hi), precisions


def test_a_changed_split_uses_the_shards_of_the_old_one(pipeline, tmp_path):
    """An elastic group that shrank or grew: 2 ranks, of which one finished (rows 0-12),
    then 3 ranks. The new rank 0's rows are all in the old shard: it computes none."""
    from kaggle_tta.engine.assembly import assemble_entries

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
        assert (
            str(p)
            in json.loads((plan.cache_root / m.name / m.fingerprint("fp32") / "manifest.json").read_text())["used_by"]
        )
    main(["blend", str(p)])
    _same(single, p)


def test_rank_0_checks_the_disk_for_every_share_and_the_assembly(pipeline, tmp_path, monkeypatch):
    """Each rank checks only its own share; rank 0 checks the whole run before any share is
    written: every missing row of every view plus the largest view once more (the assembly),
    less what shards hold already. Sizes from a finished run's files (their rows, no header)."""
    import shutil
    from types import SimpleNamespace

    from kaggle_tta.cache.files import size_text
    from kaggle_tta.engine import shares as ranked

    single = _classification(pipeline[1], tmp_path, "single")
    run(single, progress=False)
    sizes = [
        int(np.prod(a.shape)) * a.itemsize
        for f in sorted((tmp_path / "single" / "cache").glob("*/*/*.npy"))
        if not f.name.startswith(("_", "sizes"))
        for a in [np.load(f, mmap_mode="r")]
    ]
    whole = sum(sizes) + max(sizes)
    p = _classification(pipeline[1], tmp_path, "disk")
    plan = build_plan(load_pipeline(p))
    precisions = {m.name: SimpleNamespace(ran_in="fp32", note="") for m in plan.members}
    real = shutil.disk_usage

    def free(nbytes):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=nbytes))

    free(whole)
    assert ranked.space_short(plan, precisions, 2) is None
    free(whole - 1)
    why = ranked.space_short(plan, precisions, 2)
    assert why is not None and "\n" not in why and f"need {size_text(whole)}" in why and "cache.dtype" in why, why
    monkeypatch.setattr(shutil, "disk_usage", real)
    _share(plan, *Ranks(0, 2, 0, 2).share(24, 4))  # half the rows in shards: half of each view to come
    held = sum(
        f.stat().st_size
        for f in (tmp_path / "disk" / "cache").glob("*/*/shards/*/*.npy*")
        if not f.name.startswith(("_", "sizes"))
    )
    free(whole - 1)
    why = ranked.space_short(plan, precisions, 2)
    assert why is None or f"need {size_text(whole - held)}" in why, (why, whole, held)
    free(0)
    assert f"need {size_text(whole - held)}" in ranked.space_short(plan, precisions, 2)


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
    from kaggle_tta.config.errors import ConfigError
    from kaggle_tta.dist.ranks import device_for

    with pytest.raises(ConfigError, match="names one GPU"):
        device_for("cuda:1", Ranks(0, 2, 0, 2))


def _corrupt_last(pipeline, tmp: Path, name: str) -> Path:
    """The factory pipeline (_slow, no delay: no timm to import on every rank) on a copy of the
    demo set whose last image is not an image (found by the loader, in the last rank's share;
    the listing does not read the images)."""
    import shutil

    images = tmp / f"{name}-images"
    shutil.copytree(Path(pipeline[1]["data"]["folder"]), images)
    sorted(images.glob("*.png"))[-1].write_bytes(b"not a png")
    p = _slow(pipeline, tmp, name, 0.0)
    cfg = yaml.safe_load(p.read_text())
    cfg["data"]["folder"] = str(images)
    cfg["data"]["labels"] = {"path": str(images / "labels.csv")}
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_a_rank_failing_on_another_node_stops_every_rank_with_one_line(pipeline, tmp_path):
    """Two agents (two nodes): rank 1's share holds an image that cannot be decoded. Rank 1
    fails; rank 0, on the other agent, stops within seconds (not at a barrier after 48 h)
    naming rank 1's error, and neither prints a traceback of ours."""
    p = _corrupt_last(pipeline, tmp_path, "bad")
    args = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv_id",
        "bad",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "kaggle_tta", "run", str(p), "-q"]
    done = _finish(cmd, cmd, timeout=120)
    assert all(d.returncode != 0 for d in done), [d.stderr[-2000:] for d in done]
    errs = "\n".join(d.stderr for d in done)
    assert "kaggle-tta: rank 1/2: error: " in errs and "img_00023" in errs, errs[-3000:]
    stopped = [ln for ln in errs.splitlines() if ln.startswith("kaggle-tta: rank 0/2: error: ")]
    assert (
        len(stopped) == 1 and "rank 1/2 on " in stopped[0] and "failed: " in stopped[0] and "img_00023" in stopped[0]
    ), errs[-3000:]
    assert "kaggle_tta/" not in errs, errs[-3000:]  # no traceback through our code


# ---- ranks started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT; rank 0 hosts the store) ----


_CHECK_SHARED = """
import os, sys, time
from pathlib import Path
from kaggle_tta.dist import group as dist
from kaggle_tta.dist.checks import check_shared
from kaggle_tta.dist.ranks import current
r = current()
dist.join(r)
try:
    t = time.monotonic()
    check_shared(Path(os.environ["KAGGLE_TTA_TEST_ROOT"]), r)
    print(f"shared in {time.monotonic() - t:.2f}s")
    dist._GROUP[0].settle()  # rank 0 hosts the store: it leaves once rank 1 has read the last exchange
except Exception as exc:
    dist.failed(exc, r)
    print(f"kaggle-tta: {r}: error: {exc}", file=sys.stderr)
    sys.exit(2)
finally:
    dist.leave()
"""


def _ranks_by_hand(
    cmds: list[list[str]], envs: list[dict[str, str]], timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """One process per rank, as a launcher other than torchrun would start them: no agent,
    rank 0 hosts the store (torch's env:// rendezvous); ``envs``: each rank's own variables."""
    port, world = str(_free_port()), str(len(cmds))
    procs = []
    try:
        for k, (c, extra) in enumerate(zip(cmds, envs)):
            env = {
                **_env(),
                "RANK": str(k),
                "WORLD_SIZE": world,
                "LOCAL_RANK": str(k),
                "LOCAL_WORLD_SIZE": world,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                **extra,
            }
            procs.append(
                subprocess.Popen(
                    c,
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        outs = [q.communicate(timeout=timeout) for q in procs]
    finally:
        _kill_groups(procs)
    return [subprocess.CompletedProcess(c, q.returncode, out, err) for c, q, (out, err) in zip(cmds, procs, outs)]


def _one_line(done: subprocess.CompletedProcess) -> str:
    """The one line a rank wrote on stderr (no traceback, no log of torch's)."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def _check_shared(roots: list[Path]) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-c", _CHECK_SHARED]
    return _ranks_by_hand([cmd] * len(roots), [{"KAGGLE_TTA_TEST_ROOT": str(root)} for root in roots], timeout=60)


@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_a_cache_dir_a_rank_cannot_write_is_named_on_every_rank(tmp_path, how):
    """Rank 1's cache.dir cannot be written (a path under a regular file, which root cannot
    make a folder either; or a read-only folder, for a user other than root): every rank says
    which rank, on which host, and the OS's reason — not "not shared"."""
    good = tmp_path / "cache"
    if how == "under_a_file":
        (tmp_path / "a-file").write_text("")
        bad = tmp_path / "a-file" / "cache"
        reason = "NotADirectoryError"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder; the under_a_file case covers root")
        bad = tmp_path / "read-only"
        bad.mkdir(mode=0o500)
        reason = "PermissionError"
    done = _check_shared([good, bad])
    for d in done:
        assert d.returncode == 2, d.stderr[-3000:]
        line = _one_line(d)
        assert f"rank 1 on {socket.gethostname()} cannot write {bad} ({reason}" in line, line
        assert (
            "give every rank a cache.dir it can write" in line
            and "rank 0 on" not in line
            and "do not see one folder" not in line
        ), line
    assert list((good / ".ranks").iterdir()) == [], "rank 0 removed its token"


def test_a_shared_cache_dir_is_seen_at_once_and_stale_tokens_are_removed(tmp_path):
    """Two ranks on one folder pass without waiting out SHARED_WAIT; rank 0 removes what runs
    killed over an hour ago left in .ranks (a folder, a file) and keeps a fresh one (a run of
    another pipeline on this cache, now)."""
    shared = tmp_path / "cache" / ".ranks"
    (shared / "old").mkdir(parents=True)
    (shared / "old" / "1").write_text("host")
    (shared / "old-file").write_text("")
    (shared / "fresh").mkdir()
    hour_ago = time.time() - 3700
    for q in (shared / "old" / "1", shared / "old", shared / "old-file"):
        os.utime(q, (hour_ago, hour_ago))
    done = _check_shared([tmp_path / "cache"] * 2)
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
        assert float(d.stdout.split("shared in ")[1].split("s")[0]) < 8, d.stdout  # SHARED_WAIT is 10 s
    assert sorted(q.name for q in shared.iterdir()) == ["fresh"]


def test_a_token_hidden_for_a_while_is_looked_for_again(tmp_path):
    """NFS's attribute cache can hide another node's fresh token for seconds: the look lists
    the folder again until it appears (or the wait ends, naming the ranks still unseen)."""
    import threading

    from kaggle_tta.dist.checks import _look

    folder = tmp_path / ".ranks" / "token"
    folder.mkdir(parents=True)
    (folder / "0").write_text("")
    late = threading.Timer(1.0, lambda: (folder / "1").write_text(""))
    late.start()
    t = time.monotonic()
    try:
        assert _look(folder, 2, 5.0) == []
    finally:
        late.join()
    assert 0.9 < time.monotonic() - t < 4
    t = time.monotonic()
    assert _look(folder, 4, 0.6) == [2, 3]
    assert 0.5 < time.monotonic() - t < 2
    t = time.monotonic()
    assert _look(folder, 2, 5.0) == [] and time.monotonic() - t < 0.5  # all seen at once: no wait


def _no_labels(pipeline, tmp: Path, name: str, drop_last: bool = False) -> Path:
    """The slow pipeline (no model runs where the marks folder stays absent) on a copy of the
    demo images without labels; ``drop_last``: one image fewer."""
    import shutil

    images = tmp / f"{name}-images"
    shutil.copytree(Path(pipeline[1]["data"]["folder"]), images)
    if drop_last:
        sorted(images.glob("*.png"))[-1].unlink()
    p = _slow(pipeline, tmp, name, 0.0)
    cfg = yaml.safe_load(p.read_text())
    cfg["data"]["folder"] = str(images)
    cfg["data"].pop("labels", None)
    cfg["cache"]["dir"] = str(tmp / "cache")  # one cache for both ranks
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.parametrize("differs", ["batch_size", "test_set"])
def test_ranks_running_another_job_are_refused_before_any_forward(pipeline, tmp_path, differs):
    """Rank 1 runs the pipeline with another runtime.batch_size (--set), or on a folder with
    one image fewer: both ranks exit 2 with one line naming rank 1, its host, the field and
    both values, before any model is built or any entry written."""
    p0 = _no_labels(pipeline, tmp_path, "node0")
    p1 = p0 if differs == "batch_size" else _no_labels(pipeline, tmp_path, "node1", drop_last=True)
    extra = ["--set", "runtime.batch_size=8"] if differs == "batch_size" else []
    cmds = [
        [sys.executable, "-m", "kaggle_tta", "run", str(p0), "-q"],
        [sys.executable, "-m", "kaggle_tta", "run", str(p1), "-q", *extra],
    ]
    done = _ranks_by_hand(cmds, [{}, {}])
    want = (
        "runtime.batch_size is 8 there and 4 on rank 0"
        if differs == "batch_size"
        else "the test set's image count is 23 there and 24 on rank 0"
    )
    for k, d in enumerate(done):
        assert d.returncode == 2, d.stderr[-3000:]
        line = _one_line(d)
        assert line.startswith(
            f"kaggle-tta: rank {k}/2: error: rank 1/2 on {socket.gethostname()} runs another job than rank 0 on "
        ), line
        assert (
            want in line
            and "the same pipeline.yaml, the same --set/--overrides and the same test set on every node" in line
        ), line
    assert not (tmp_path / "marks").exists(), "no model ran"
    assert [q.name for q in (tmp_path / "cache").iterdir() if not q.name.startswith(".")] == [], "no entry written"
    assert not (tmp_path / "cache" / ".ranks").exists(), "refused before cache.dir was looked at"


_JOIN = """
import sys
from datetime import timedelta
from kaggle_tta.dist import group as dist
from kaggle_tta.cli import main
dist.JOIN_TIMEOUT = timedelta(seconds=2)
sys.exit(main(sys.argv[1:]))
"""


def test_a_store_nobody_serves_is_one_line(pipeline, tmp_path):
    """Rank 1 alone, MASTER_PORT where nobody listens: the client's retries (torch logs each
    with a stack of C++ frames) end in one line naming the endpoint. Rank 0 alone hosts the
    store and waits for a rank 1 that never comes: one line naming the wait. Exit 2 both.
    (The two are run side by side, each on a port of its own: both mostly wait.)"""
    p = _slow(pipeline, tmp_path, "alone", 0.0)  # a factory member: no timm to import
    ports = [_free_port()]
    while len(ports) < 2:  # rank 1's port must not be the one rank 0 serves
        ports += [q for q in [_free_port()] if q != ports[0]]
    cmds = [[sys.executable, "-c", _JOIN, "run", str(p), "-q"] for _ in range(2)]
    envs = [
        {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[rank])}
        for rank in range(2)
    ]
    t = time.monotonic()
    procs = [
        subprocess.Popen(c, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, e in zip(cmds, envs)
    ]
    try:
        outs = [q.communicate(timeout=60) for q in procs]
    finally:
        for q in procs:
            q.kill()
    host, client = (subprocess.CompletedProcess(c, q.returncode, *o) for c, q, o in zip(cmds, procs, outs))
    for done in (host, client):
        assert done.returncode == 2, done.stderr[-3000:]
    line = _one_line(client)
    assert line.startswith(
        f"kaggle-tta: rank 1/2: error: cannot reach the launcher's store at 127.0.0.1:{ports[1]} (MASTER_ADDR:MASTER_PORT; "
    ), line
    line = _one_line(host)
    assert line.startswith(
        f"kaggle-tta: rank 0/2: error: rank 0/2 hosts the ranks' store at 127.0.0.1:{ports[0]} and waited 0:00:02 for the others"
    ), line
    assert time.monotonic() - t < 40


def test_a_store_failing_past_every_catch_is_one_line_under_ranks(pipeline, tmp_path, monkeypatch, capsys):
    """The CLI's last net under torchrun: a store error no closer code turned into a line
    (here raised by the command itself) is one line naming the store, exit 2; a rank-less
    run's own bug still raises."""
    import torch.distributed as tdist

    from kaggle_tta import cli

    def lost(args) -> None:
        raise tdist.DistNetworkError("Connection reset by peer")

    p = _classification(pipeline[1], tmp_path, "net")
    monkeypatch.setitem(cli.COMMANDS, "blend", (lost, "blend", False))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert main(["blend", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "kaggle-tta: rank 0/2: error: lost the launcher's store at 127.0.0.1:29999 (DistNetworkError: Connection reset by peer)"
    ), err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(tdist.DistNetworkError):
        main(["blend", str(p)])


def test_a_rank_failing_under_runtime_devices_prints_our_lines_only(pipeline, tmp_path):
    """runtime.devices: 2 and rank 1's share holds an image that cannot be decoded: every line
    on stderr is ours (each rank's, then the launching process's), none of torch's logged
    tracebacks, terminations, C++ store warnings or leaked-semaphore warnings; exit 2."""
    p = _corrupt_last(pipeline, tmp_path, "devices")
    cfg = yaml.safe_load(p.read_text())
    cfg["runtime"]["devices"] = 2
    p.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "kaggle_tta", "run", str(p), "-q"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("kaggle-tta: ") for ln in lines), done.stderr[-3000:]
    assert lines[-1].startswith("kaggle-tta: error: runtime.devices: 2 ranks started"), lines
    assert any("img_00023" in ln for ln in lines), lines


def test_a_rank_killed_without_restarts_leaves_a_line_of_ours(pipeline, tmp_path):
    """torchrun without --max-restarts, rank 1 killed (SIGKILL) mid-run: the agent stops rank 0
    (SIGTERM), which says so in one line of ours, its committed rows kept; torchrun's own
    report follows (not ours to silence) and the exit is non-zero."""
    p = _slow(pipeline, tmp_path, "nokill", 0.4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kaggle_tta",
        "run",
        str(p),
        "-q",
    ]
    deadline, killed = time.time() + 120, None
    with _started(cmd) as (proc,):
        while time.time() < deadline and killed is None and proc.poll() is None:
            marks = list((tmp_path / "marks").glob("1.0.*")) if (tmp_path / "marks").is_dir() else []
            if marks and list((tmp_path / "marks").glob("0.0.*")):  # both ranks are forwarding
                killed = int(marks[0].name.split(".")[2])
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=180)
    assert killed is not None, "rank 1 never forwarded"
    assert proc.returncode != 0, err[-3000:]
    ours = [ln for ln in err.splitlines() if ln.startswith("kaggle-tta: rank 0/2: ")]
    assert len(ours) == 1 and "stopped by the launcher" in ours[0] and "cache keeps" in ours[0], err[-3000:]
    assert "kaggle_tta/" not in err, err[-3000:]  # no traceback through our code
