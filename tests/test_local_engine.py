"""The in-process engine: resume after a kill, sweeps (skip, continue past failures), reports."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

import byzflower.experiments.sweep as sweep_module
from byzflower.config import DEFAULTS, ConfigError, resolve
from byzflower.engine import LocalRun, run_local
from byzflower.experiments.report import collect, csv_text, markdown, table, write_report
from byzflower.experiments.sweep import Cell, grid, interrupt_runs, parse_axis, run_sweep, stop_record
from byzflower.flower.flower_runner import (
    _free_port,  # a port where nothing listens
    toml_assignments,
)
from byzflower.records.plots import plot_run
from byzflower.records.results import RunDirectory

TIMING = {"elapsed_s", "iters_per_s"}
RUN = {"num-honest": 10, "num-byzantine": 3, "seed": 5}


def _records(path):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_numbers(tmp_path):
    overrides = {
        **RUN,
        "optimizer": "saga",
        "attack": "gaussian",
        "aggregator": "centered-clipping",
        "num-server-rounds": 200,
        "eval-every": 20,
        "checkpoint-every": 40,
        "eval-train-samples": 1000,
        "results-dir": str(tmp_path),
    }
    run_local(resolve({**overrides, "run-name": "straight"}), log=lambda _: None)

    def command():
        text = toml_assignments(overrides)
        return [
            sys.executable,
            "-m",
            "byzflower.cli",
            "run",
            "--engine",
            "local",
            "--run-config",
            f"{text} run-name='killed'",
        ]

    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = subprocess.Popen(command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # kill it once it is past a checkpoint, between two
            done = metrics.exists() and metrics.read_text().count("\n")
            if done and done >= 3 and (tmp_path / "killed" / "checkpoint.pt").exists():
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # its summary still says running, and no process holds the folder: seen as ending without a record
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["status"] == "running"
    assert stop_record(tmp_path / "killed")["status"] == "no record"
    assert subprocess.run(command(), capture_output=True, timeout=600).returncode == 0
    resumed = _records(metrics)
    assert [r["iteration"] for r in resumed] == list(range(0, 201, 20))
    [at] = json.loads((tmp_path / "killed" / "summary.json").read_text())["resumed_at"]
    assert at % 40 == 1 and at > 1  # right after a checkpoint (every 40)
    assert resumed == _records(tmp_path / "straight" / "metrics.jsonl")
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_its_records(tmp_path):
    """Named, killed after some evaluations but before any checkpoint, started again: it runs from the
    start and its records are the uninterrupted run's, each iteration once (they were appended after the
    old ones: 0, 2, 0, 2, 4; the Flower engine already started over)."""
    overrides = {**RUN, "num-server-rounds": 4, "eval-every": 2, "checkpoint-every": 0, "results-dir": str(tmp_path)}
    run_local(resolve({**overrides, "run-name": "straight"}), log=lambda _: None)
    cfg = resolve({**overrides, "run-name": "killed"})
    first = LocalRun(cfg, log=lambda _: None)
    first.recorder.begin(1)
    first.recorder.evaluate(0, first.x)
    for t in (1, 2):
        first.step(t)
    first.recorder.evaluate(2, first.x)
    first.run_dir.unlock()  # as the kernel does for a killed process
    assert run_local(cfg, log=lambda _: None)["status"] == "finished"
    again = _records(tmp_path / "killed" / "metrics.jsonl")
    assert [r["iteration"] for r in again] == [0, 2, 4]
    assert again == _records(tmp_path / "straight" / "metrics.jsonl")


def interrupted_after(run: LocalRun, iteration: int) -> None:
    """Run ``run`` and stop it (as SIGTERM does) once ``iteration`` is done: it records itself interrupted."""
    step = run.step

    def until(t: int) -> None:
        if t > iteration:
            raise KeyboardInterrupt("stopped by SIGTERM")
        step(t)

    run.step = until
    with pytest.raises(KeyboardInterrupt):
        run.run()


def test_a_finished_named_run_started_again_is_left_exactly_as_it_was(tmp_path):
    """Run again under its name, a finished run is reported, not rebuilt: every file of its folder keeps
    its bytes (the records were emptied: the start-over of a run killed before its first checkpoint
    took the finished run, whose checkpoint is deleted at its end, for one)."""
    cfg = resolve({**RUN, "num-server-rounds": 4, "eval-every": 2, "results-dir": str(tmp_path), "run-name": "done"})
    said = []
    first = run_local(cfg, log=said.append)
    folder = tmp_path / "done"
    accuracy = f"{first['final']['test_accuracy']:.4f}"  # four digits, as the progress lines give it
    assert said[-1] == f"finished: final test accuracy {accuracy}; results in {folder}"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    lines = []
    again = run_local(cfg, log=lines.append)
    assert again["status"] == "finished" and again["final"] == first["final"]
    assert lines == [f"already finished: {folder}"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    run = LocalRun(cfg, log=lambda _: None)  # the object itself builds nothing and runs nothing
    assert run.done is not None and not hasattr(run, "workers")
    assert run.run()["final"] == first["final"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_resumed_run_that_fails_before_it_starts_keeps_what_its_summary_said(tmp_path, monkeypatch):
    """A named run interrupted at iteration 4 (checkpoint at 2), started again, fails while it is built:
    summary.json says so, and still says what the folder holds (iterations, final record, totals), and the
    records are untouched (it was a summary of 'iterations: 0' and nothing else)."""
    import byzflower.engine as engine

    cfg = resolve(
        {**RUN, "num-server-rounds": 6, "eval-every": 2, "checkpoint-every": 2, "results-dir": str(tmp_path)}
        | {"run-name": "again"}
    )
    interrupted_after(LocalRun(cfg, log=lambda _: None), 4)
    folder = tmp_path / "again"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] == 4
    records = (folder / "metrics.jsonl").read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt("stopped by SIGINT")

    monkeypatch.setattr(engine, "recorder_of", broken)
    with pytest.raises(KeyboardInterrupt):
        LocalRun(cfg, log=lambda _: None)
    after = json.loads((folder / "summary.json").read_text())
    assert after["status"] == "interrupted" and "SIGINT" in after["error"]
    assert after["iterations"] == 4 and after["final"] == summary["final"] and after["totals"] == summary["totals"]
    assert (folder / "metrics.jsonl").read_bytes() == records


def _sweep_overrides():
    return {**RUN, "num-server-rounds": 6, "eval-every": 3}


def test_sweep_skips_finished_runs_and_continues_past_a_failing_one(tmp_path):
    cells = grid(["sgd"], ["mean", "gm"], ["none", "sign-flip"])
    # a folder holding files but no run makes that cell fail at run time; the sweep writes nothing there
    clash = tmp_path / "sgd-gm-none"
    clash.mkdir()
    (clash / "notes.txt").write_text("mine")
    lines = []
    outcomes = run_sweep(cells, _sweep_overrides(), tmp_path, say=lines.append)
    status = {o["name"]: o["status"] for o in outcomes}
    assert status == {
        "sgd-mean-none": "finished",
        "sgd-mean-sign-flip": "finished",
        "sgd-gm-none": "failed",
        "sgd-gm-sign-flip": "finished",
    }
    failed = next(o for o in outcomes if o["name"] == "sgd-gm-none")
    assert "holds notes.txt but no run" in failed["error"]
    assert sorted(p.name for p in clash.iterdir()) == ["notes.txt"]  # (it wrote a summary over a folder not its own)
    assert any("ETA" in line for line in lines)
    before = (tmp_path / "sgd-mean-none" / "metrics.jsonl").stat().st_mtime_ns
    (clash / "notes.txt").unlink()
    again = run_sweep(cells, _sweep_overrides(), tmp_path, say=lines.append)
    assert [o.get("skipped", False) for o in again] == [True, True, False, True]
    assert all(o["status"] == "finished" for o in again)
    assert (tmp_path / "sgd-mean-none" / "metrics.jsonl").stat().st_mtime_ns == before  # not rerun
    assert not any(p.name.startswith("sgd-gm-none-") for p in tmp_path.iterdir())  # in its own folder


def test_a_cell_that_failed_before_its_run_began_runs_again_in_its_own_folder(tmp_path):
    """A run that fails before its folder holds a run (data that cannot be fetched, say) leaves only the
    sweep's summary.json there. Run again, it went to a new folder, ``-2``, then ``-3`` at the next sweep,
    while the sweep kept reading the first one: the cell failed forever and the report saw copies."""
    cells = grid(["sgd"], ["mean"], ["gaussian"])
    folder = tmp_path / "sgd-mean-gaussian"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"status": "failed", "error": "DataError: no internet"}))
    for _ in range(2):
        (outcome,) = run_sweep(cells, _sweep_overrides(), tmp_path, say=lambda _: None)
    assert outcome["status"] == "finished" and outcome.get("skipped")
    assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
    assert (folder / "config.json").exists()
    assert not any(p.name.startswith("sgd-mean-gaussian-") for p in tmp_path.iterdir())


def test_a_sweep_refuses_a_folder_holding_a_run_of_another_config_before_any_work(tmp_path):
    """Run again with another --run-config into the same --out, a sweep took every finished run there for
    its own (its report then showed 3-iteration runs for a 6-iteration sweep) and wrote 'failed' over the
    summaries of unfinished ones; now it names the cells and keys and runs nothing. A folder moved
    elsewhere is the same run (results-dir is not compared)."""
    cells = grid(["sgd"], ["mean", "gm"], ["gaussian"])
    short = {**_sweep_overrides(), "num-server-rounds": 3}
    run_sweep(cells, short, tmp_path / "a", say=lambda _: None)
    files = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file() and p.parent != tmp_path / "a"}
    with pytest.raises(ConfigError) as caught:
        run_sweep(cells, _sweep_overrides(), tmp_path / "a", say=lambda _: None)
    message = str(caught.value)
    for cell in ("sgd-mean-gaussian", "sgd-gm-gaussian"):
        assert f"{cell}: {tmp_path / 'a' / cell} holds a run with another config, differing in " in message
    assert "num-server-rounds (3 there, 6 now)" in message and "use another --out" in message
    assert {p: p.read_bytes() for p in files} == files
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = run_sweep(cells, short, tmp_path / "b", say=lambda _: None)
    assert all(o.get("skipped") for o in moved)


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_parallel_sweep_gives_the_sequential_numbers(tmp_path, backend, monkeypatch):
    """Also: a `ray start` that left its address recorded (here a dead one) does not capture the sweep's
    Ray, which ``ray.init()`` would join (and fail: 'num_cpus ... must not be provided'); and --jobs
    beyond the runs (10**20 for 2) takes one slot per run (Ray's num_cpus, each run's threads)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths live below it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    launcher = "_ray_runs" if backend == "ray" else "_process_runs"
    slots, original = [], getattr(sweep_module, launcher)
    monkeypatch.setattr(sweep_module, launcher, lambda jobs, *rest: slots.append(jobs) or original(jobs, *rest))
    cells = grid(["sgd", "batch-sgd"], ["median"], ["ipm"])
    try:
        outcomes = run_sweep(cells, _sweep_overrides(), tmp_path, jobs=10**20, say=lambda _: None, backend=backend)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert [o["status"] for o in outcomes] == ["finished", "finished"] and slots == [2]
    sequential = tmp_path / "seq"
    run_sweep(cells[:1], _sweep_overrides(), sequential, say=lambda _: None)
    assert _records(tmp_path / "sgd-median-ipm" / "metrics.jsonl") == _records(
        sequential / "sgd-median-ipm" / "metrics.jsonl"
    )


def test_a_sweep_runs_where_only_torch_is_installed_and_gives_this_machines_numbers(tmp_path):
    """A lent GPU machine has torch but no Flower, no Ray and no flwr-datasets (benchmarks/gpu_paper.sh):
    `python -m byzflower.cli sweep --backend processes` must run there from the split cached here, in
    the sweep's process and in its spawned runs alike, and give the numbers of a sweep run in-process."""
    stubs = tmp_path / "stubs"
    for name in ("flwr", "ray", "flwr_datasets"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this machine')\n")
    overrides = {**_sweep_overrides(), "model": "mlp-notebook"}
    config = toml_assignments(overrides)
    cells = grid(["sgd", "saga"], ["gm"], ["sign-flip"])
    run_sweep(cells, overrides, tmp_path / "here", say=lambda _: None)  # also caches the split
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(Path(__file__).resolve().parent.parent)])}
    args = ["--optimizer", "sgd,saga", "--aggregator", "gm", "--attack", "sign-flip", "--run-config", config]
    args += ["--jobs", "2", "--backend", "processes", "--no-report", "--out", str(tmp_path / "there")]
    done = subprocess.run(
        [sys.executable, "-m", "byzflower.cli", "sweep", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is not installed on this machine" not in done.stdout + done.stderr
    assert _sweep_statuses(tmp_path / "there") == {"sgd-gm-sign-flip": "finished", "saga-gm-sign-flip": "finished"}
    for name in ("sgd-gm-sign-flip", "saga-gm-sign-flip"):
        here, there = (_records(tmp_path / d / name / "metrics.jsonl") for d in ("here", "there"))
        assert len(here) == 3 and here == there


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_a_stopped_sweep_interrupts_its_runs_and_leaves_no_process(tmp_path, backend):
    """SIGTERM to the sweep (as `timeout` or a scheduler sends it): the running runs record that they
    were interrupted, the queued one never starts, no worker survives and no traceback is printed,
    and nothing is left in the temporary folder (Ray would leave its session files in $TMPDIR/ray).
    (With Ray, ``ray.init`` took SIGTERM over and the sweep aborted 3 s later with no summaries.)"""
    config = "num-honest=10 num-byzantine=3 seed=5 num-server-rounds=100000 eval-every=20"
    args = ["--backend", backend, "--attack", "none,sign-flip,zero-gradient", "--run-config", config]
    names = ("sgd-mean-none", "sgd-mean-sign-flip")
    scratch = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))  # short: Ray's sockets go below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"} | {"TMPDIR": str(scratch)}
    try:
        proc, out, err, _ = _sweep_stopped_by_sigterm(args, tmp_path, names, env)
        assert _survivors(proc.pid) == []
        assert sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 130
    assert "interrupted: stopped by SIGTERM" in err and "Traceback" not in err
    for name in names:
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "interrupted"
        assert re.search(rf"stopped: {name} interrupted \(last evaluated iteration \d+\)", out)
    assert not (tmp_path / "sgd-mean-zero-gradient" / "metrics.jsonl").exists()
    assert "stopped: sgd-mean-zero-gradient not started" in out
    assert _sweep_statuses(tmp_path) == {
        "sgd-mean-none": "interrupted",
        "sgd-mean-sign-flip": "interrupted",
        "sgd-mean-zero-gradient": "not started",
    }
    assert _survivors(proc.pid) == []


DEAF_MODEL = """
import multiprocessing
import signal

from torch import nn

if multiprocessing.parent_process() is not None:  # in a sweep's worker process: Ctrl-C is swallowed
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def factory(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
"""


def test_a_run_that_ignores_the_stop_is_killed_after_the_grace_and_reported(tmp_path):
    """User code that swallows SIGINT must not hang a stopped sweep: after --stop-grace its process
    is killed, and the stop report says the run ended without a record."""
    (tmp_path / "deaf_model.py").write_text(DEAF_MODEL)
    config = "num-honest=10 num-byzantine=3 num-server-rounds=100000 eval-every=20 model='deaf_model:factory'"
    args = ["--backend", "processes", "--attack", "none,sign-flip", "--stop-grace", "3", "--run-config", config]
    out_dir = tmp_path / "runs"
    names = ("sgd-mean-none", "sgd-mean-sign-flip")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc, out, err, took = _sweep_stopped_by_sigterm(args, out_dir, names, env)
    assert proc.returncode == 130 and "Traceback" not in err
    assert 3 <= took < 30
    for name in names:
        assert json.loads((out_dir / name / "summary.json").read_text())["status"] == "running"
        assert f"stopped: {name} no record" in out and "it ended without writing one" in out
    assert _sweep_statuses(out_dir) == dict.fromkeys(names, "no record")
    assert _survivors(proc.pid) == []


def test_a_run_the_sweep_cannot_cancel_is_interrupted_through_its_folders_lock(tmp_path):
    """The Ray sweep's fallback when a cancel does not reach a run: SIGINT to the process that holds
    the run's folder (its lock names it), which then records that it was interrupted."""
    config = f"num-honest=10 num-byzantine=3 num-server-rounds=100000 eval-every=20 results-dir='{tmp_path}'"
    command = [sys.executable, "-m", "byzflower.cli", "run", "--engine", "local"]
    proc = subprocess.Popen(
        [*command, "--run-config", f"{config} run-name='long'"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    folder = tmp_path / "long"
    try:
        deadline = time.monotonic() + 120
        metrics = folder / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.1)
        assert stop_record(folder)["status"] == "running"  # held by a live process: not "no record"
        assert interrupt_runs([folder, tmp_path / "no-such-run"]) == [proc.pid]
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    record = stop_record(folder)
    assert record["status"] == "interrupted" and record["iterations"] >= 20
    assert interrupt_runs([folder]) == []  # the lock is free: nothing to signal


def _sweep_stopped_by_sigterm(args: list[str], out_dir, names, env=None):
    """`byzflower sweep --jobs 2` over sgd + mean (more ``args``) into ``out_dir``, sent SIGTERM once
    the runs ``names`` have records; returns (process, stdout, stderr, seconds from the signal to exit)."""
    command = [sys.executable, "-m", "byzflower.cli", "sweep", "--jobs", "2", "--optimizer", "sgd"]
    proc = subprocess.Popen(
        [*command, "--aggregator", "mean", *args, "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all((out_dir / n / "metrics.jsonl").exists() for n in names):
            time.sleep(0.1)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        return proc, out, err, time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_a_run_whose_process_is_killed_fails_alone_and_resumes_in_the_next_sweep(tmp_path, backend):
    """SIGKILL (what the out-of-memory killer sends) to one run's process: that run is recorded as
    failed, saying how its process ended and how far its records got; the other runs go on and
    finish; no traceback. (With a process pool, the pool broke: every running run was killed,
    recorded as 'no record' at iteration 0, and the sweep ended in a BrokenProcessPool traceback;
    Ray reran the run unsaid.) The next sweep resumes the killed run from its checkpoint (checked
    with local processes; Ray's runs resume through the same run_cell)."""
    config = "num-honest=10 num-byzantine=3 seed=5 num-server-rounds=600 eval-every=50 checkpoint-every=100"
    config += " eval-train-samples=500"
    command = [sys.executable, "-m", "byzflower.cli", "sweep", "--jobs", "2", "--backend", backend]
    command += ["--optimizer", "sgd"]
    command += ["--aggregator", "mean", "--attack", "none,sign-flip,zero-gradient", "--run-config", config]
    command += ["--out", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = tmp_path / "sgd-mean-sign-flip"
    try:
        deadline = time.monotonic() + 120
        # 4 records: iteration 150, after the checkpoint of iteration 100, which the next sweep resumes from
        while time.monotonic() < deadline and len(RunDirectory(victim).records()) < 4:
            time.sleep(0.1)
        pid = RunDirectory(victim).holder()
        assert pid is not None and pid != proc.pid
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "Traceback" not in err, err
    why = {
        "processes": "its process was killed by SIGKILL (what the system's out-of-memory killer sends) before the "
        "run finished",
        "ray": "its Ray worker was lost (",
    }[backend]
    assert f"sgd-mean-sign-flip: failed ({why}" in out, out[-3000:]
    reached = RunDirectory(victim).records()[-1]["iteration"]
    assert 150 <= reached < 600
    summary = json.loads((victim / "summary.json").read_text())
    assert (summary["status"], summary["iterations"]) == ("failed", reached) and summary["error"].startswith(why)
    assert _sweep_statuses(tmp_path) == {
        "sgd-mean-none": "finished",
        "sgd-mean-sign-flip": "failed",
        "sgd-mean-zero-gradient": "finished",
    }
    assert _survivors(proc.pid) == []
    if backend == "ray":
        return
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 already finished" not in again.stdout and "2 already finished" in again.stdout
    assert "resum" in again.stdout.lower(), again.stdout[-2000:]
    records = RunDirectory(victim).records()
    assert [r["iteration"] for r in records] == list(range(0, 601, 50))
    assert json.loads((victim / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_a_sweep_killed_hard_leaves_no_run_going(tmp_path, backend):
    """SIGKILL to the sweep itself (no handler runs). Local processes: its runs' processes get SIGINT
    from the kernel (PR_SET_PDEATHSIG), record that they were interrupted and end, instead of computing
    on with no one to wait for them (a process pool's workers finished their runs first). Ray: the Ray
    it started goes with it, runs included, but its services outlived it (agents for minutes) with
    its folder, and the runs said 'running'; now the sweep's watchdog stops what is left by PID,
    records the runs as failed (a later sweep resumes them) and deletes the folder."""
    config = "num-honest=10 num-byzantine=3 seed=5 num-server-rounds=100000 eval-every=20"
    command = [sys.executable, "-m", "byzflower.cli", "sweep", "--jobs", "2", "--backend", backend, "--optimizer"]
    command += ["sgd", "--aggregator", "mean", "--attack", "none,sign-flip", "--run-config", config]
    command += ["--out", str(tmp_path / "out")]
    scratch = tmp_path / "tmp"  # the sweep's $TMPDIR: its Ray's folder goes there
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    errors = tmp_path / "stderr"  # a file, not a pipe: a full pipe would stop the sweep
    with errors.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env=env)
    folders = [tmp_path / "out" / n for n in ("sgd-mean-none", "sgd-mean-sign-flip")]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(len(RunDirectory(f).records()) >= 3 for f in folders):
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while any(json.loads((f / "summary.json").read_text())["status"] == "running" for f in folders):
            assert time.monotonic() < deadline, "a run still says it is running"
            time.sleep(0.1)
        assert _survivors(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(scratch)])  # a watchdog, had it not ended
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        assert 40 <= summary["iterations"] < 100000, summary
        if backend == "processes":
            assert summary["status"] == "interrupted", summary
        else:
            assert summary["status"] == "failed" and "its sweep ended without stopping it" in summary["error"]
    assert list(scratch.iterdir()) == []
    if backend == "ray":
        err = errors.read_text()
        assert "ended without stopping what it started" in err and "removed the folder" in err, err[-2000:]


def _sweep_statuses(folder: Path) -> dict[str, str]:
    """{run name: status} from a sweep's sweep.json."""
    return {o["name"]: o["status"] for o in json.loads((folder / "sweep.json").read_text())}


def _survivors(sid: int) -> list[str]:
    """The processes still running in session ``sid`` after up to 10 s (multiprocessing's resource
    tracker leaves once its pipe closes)."""
    deadline = time.monotonic() + 10
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _session(sid: int) -> list[str]:
    """'PID STATE COMMAND' of session ``sid``'s processes that have not ended. A zombie has ended:
    the orphans of a killed sweep are reparented to PID 1, which on some machines reaps them only
    seconds later (seen here: three ``<defunct>`` runs failed the test while PID 1 had not yet
    collected them)."""
    out = subprocess.run(["ps", "-s", str(sid), "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if not line.split()[1].startswith("Z")]


def test_bad_sweep_arguments_are_clear():
    with pytest.raises(ConfigError, match="backend='dask' is not valid; choose one of: auto, ray, processes"):
        run_sweep(grid(["sgd"], ["mean"], ["none"]), {}, Path("unused"), jobs=2, backend="dask")
    with pytest.raises(ConfigError, match=r"--stop-grace=0 must be > 0 seconds"):
        run_sweep(grid(["sgd"], ["mean"], ["none"]), {}, Path("unused"), jobs=2, stop_grace=0)
    with pytest.raises(ConfigError, match="--optimizer: 'adam' not valid; choose from: sgd, batch-sgd"):
        parse_axis("optimizer", "sgd,adam")
    with pytest.raises(ConfigError, match="--attack is empty"):
        parse_axis("attack", " , ")
    with pytest.raises(ConfigError, match="--aggregator repeats gm"):
        parse_axis("aggregator", "gm,mean,gm")
    with pytest.raises(ConfigError, match=r"krum-none.*needs n > 2f"):
        run_sweep([Cell("sgd", "krum", "none")], {"num-honest": 3, "aggregator-f": 1}, "/tmp/unused", say=print)


def _fake_run(root, optimizer, aggregator, attack, accuracy, status="finished", pre="none", **extra):
    folder = root / "-".join([optimizer, pre, aggregator, attack, *(f"{k}{v}" for k, v in extra.items())])
    folder.mkdir(parents=True)
    config = {"optimizer": optimizer, "aggregator": aggregator, "attack": attack, "pre-aggregator": pre}
    (folder / "config.json").write_text(json.dumps({**config, **{k.replace("_", "-"): v for k, v in extra.items()}}))
    records = [
        {"iteration": 0, "test_accuracy": 0.1, "train_loss": 2.3, "honest_variance": None},
        {"iteration": 10, "test_accuracy": accuracy, "train_loss": 0.5, "honest_variance": 3.0},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"status": status}))
    return folder


def test_the_report_sets_each_cell_beside_the_papers_table_one(tmp_path):
    from byzflower.experiments.report import PAPER_TABLE_I, beside_paper

    _fake_run(tmp_path, "saga", "gm", "zero-gradient", 0.5427)
    _fake_run(tmp_path, "sgd", "mean", "none", 0.969)
    _fake_run(tmp_path, "sgd", "gm", "none", 0.5, status="failed")
    _fake_run(tmp_path, "saga", "krum", "none", 0.9)  # not a cell of the paper's table
    text = beside_paper(collect([tmp_path]))
    rows = text.splitlines()
    assert rows[2:] == [
        "| attack | sgd mean | sgd gm | saga gm |",
        "|---|---|---|---|",
        "| none | 96.90 (97, -0.1) | failed (92.3) | - (96.3) |",
        "| zero-gradient | - (9.94) | - (26.2) | 54.27 (92.4, -38.1) |",
    ]
    assert rows[0].startswith("Final test accuracy in %: ours (the paper's Table I")
    assert PAPER_TABLE_I["sign-flip"]["batch-sgd gm"] == 90.3 and len(PAPER_TABLE_I) == 4
    assert beside_paper([r for r in collect([tmp_path]) if r.column == "saga krum"]) is None
    assert write_report([tmp_path], tmp_path / "out")["paper"].read_text() == text


def test_report_table_is_laid_out_like_the_papers_table_one(tmp_path):
    _fake_run(tmp_path, "saga", "gm", "gaussian", 0.91)
    _fake_run(tmp_path, "sgd", "mean", "gaussian", 0.12)
    _fake_run(tmp_path, "sgd", "gm", "none", 0.93)
    _fake_run(tmp_path, "sgd", "mean", "none", 0.95)
    _fake_run(tmp_path, "saga", "gm", "none", 0.5, status="failed")
    attacks, columns, cells = table(collect([tmp_path]))
    assert attacks == ["none", "gaussian"]  # the config's order of attacks
    assert columns == ["sgd mean", "sgd gm", "saga gm"]
    assert cells == {
        ("gaussian", "saga gm"): "0.9100",
        ("gaussian", "sgd mean"): "0.1200",
        ("none", "sgd gm"): "0.9300",
        ("none", "sgd mean"): "0.9500",
        ("none", "saga gm"): "failed",
    }
    assert markdown(attacks, columns, cells).splitlines() == [
        "| attack | sgd mean | sgd gm | saga gm |",
        "|---|---|---|---|",
        "| none | 0.9500 | 0.9300 | failed |",
        "| gaussian | 0.1200 | - | 0.9100 |",
    ]
    assert csv_text(attacks, columns, cells).splitlines() == [
        "attack,sgd mean,sgd gm,saga gm",
        "none,0.9500,0.9300,failed",
        "gaussian,0.1200,,0.9100",
    ]
    paths = write_report([tmp_path], tmp_path / "out")
    assert paths["figure"].stat().st_size > 10_000 and paths["csv"].exists()
    with pytest.raises(FileNotFoundError, match="no run folders"):
        collect([tmp_path / "out"])


def test_a_report_shows_every_run_seeds_as_mean_and_spread_other_settings_as_columns(tmp_path):
    """One table cell per (attack, optimizer + rule) hid all but one of the runs that shared it (the last
    folder in path order: another seed, another lr), and a pre-aggregated rule's column never showed."""
    from byzflower.experiments.report import beside_paper, worst_case

    for seed, acc in ((1, 0.90), (2, 0.94), (3, 0.92)):
        _fake_run(tmp_path, "saga", "gm", "none", acc, seed=seed)
    _fake_run(tmp_path, "saga", "gm", "none", 0.5, status="interrupted", seed=4)
    _fake_run(tmp_path, "saga", "gm", "gaussian", 0.88, seed=1)
    _fake_run(tmp_path, "saga", "gm", "sign-flip", 0.2, seed=1)
    _fake_run(tmp_path, "sgd", "gm", "none", 0.7, pre="nnm")
    runs = collect([tmp_path])
    _, columns, cells = table(runs)
    assert columns == ["sgd nnm+gm", "saga gm"]  # the config's order of optimizers
    assert cells[("none", "saga gm")] == "0.9200 ± 0.0200 (n=3) (+1 unfinished)"
    copy = tmp_path / "saga-none-gm-none-seed2-copy"  # the same experiment twice (a folder copied, say)
    shutil.copytree(tmp_path / "saga-none-gm-none-seed2", copy)
    (copy / "metrics.jsonl").write_text((copy / "metrics.jsonl").read_text().replace("0.94", "0.5"))
    _, _, with_copy = table(collect([tmp_path]))
    assert with_copy[("none", "saga gm")] == "0.9200 ± 0.0200 (n=3) (+1 unfinished) (+1 of a seed already counted)"
    shutil.rmtree(copy)
    assert cells[("gaussian", "saga gm")] == "0.8800" and cells[("none", "sgd nnm+gm")] == "0.7000"
    assert "| none | 92.00 (96.3, -4.3) |" in beside_paper(runs)  # the mean over the seeds
    assert "| saga gm | 0.9200 | 0.2000 | sign-flip | 2 | - |" in worst_case(runs)
    assert {r.label for r in runs if r.config["attack"] == "none" and r.column == "saga gm"} == {
        f"saga gm seed {s}" for s in (1, 2, 3, 4)
    }
    _fake_run(tmp_path, "saga", "gm", "gaussian", 0.6, seed=1, lr=0.5)  # another step size: its own column
    _, columns, cells = table(collect([tmp_path]))
    default_lr = DEFAULTS["lr"]
    assert columns == [f"sgd nnm+gm lr={default_lr}", f"saga gm lr={default_lr}", "saga gm lr=0.5"]
    assert cells[("gaussian", "saga gm lr=0.5")] == "0.6000"
    assert cells[("gaussian", f"saga gm lr={default_lr}")] == "0.8800"
    assert cells[("none", f"saga gm lr={default_lr}")].startswith("0.9200 ± 0.0200 (n=3)")


def test_detection_over_replicates_is_the_mean_over_their_seeds_each_counted_once(tmp_path):
    from byzflower.experiments.report import detection

    for seed, auc, name in ((1, 0.8, "a"), (2, 0.6, "b"), (2, 0.0, "c")):  # c: a copy of seed 2's experiment
        folder = _fake_run(tmp_path / name, "sgd", "gm", "sign-flip", 0.3, seed=seed)
        last = {"iteration": 20, "test_accuracy": 0.3, "detection_auc": auc, "detection_precision": auc}
        (folder / "metrics.jsonl").write_text((folder / "metrics.jsonl").read_text() + json.dumps(last) + "\n")
    assert detection(collect([tmp_path])).splitlines()[-1] == "| sgd gm | 0.70 / 0.70 |"


def test_the_figure_draws_replicates_as_their_mean_and_band_and_diverged_runs_without_noise(tmp_path):
    """Replicate seeds were drawn as lines of one colour under one legend entry, one of them possibly a
    copy of another seed or an interrupted seed; a diverged run's values printed numpy's overflow
    warnings on the console."""
    from byzflower.experiments.report import curves, figure

    for seed, acc in ((1, 0.90), (2, 0.94), (3, 0.92)):
        _fake_run(tmp_path, "saga", "gm", "none", acc, seed=seed)
    _fake_run(tmp_path, "saga", "gm", "none", 0.2, status="interrupted", seed=4)  # not with the finished ones
    copy = tmp_path / "saga-none-gm-none-seed2-copy"  # seed 2 again: counted once, the first in path order
    shutil.copytree(tmp_path / "saga-none-gm-none-seed2", copy)
    (copy / "metrics.jsonl").write_text((copy / "metrics.jsonl").read_text().replace("0.94", "0.5"))
    _fake_run(tmp_path, "sgd", "gm", "none", 0.7)
    runs = collect([tmp_path])
    saga, sgd = curves(runs, "none", "test_accuracy")
    assert (saga.column, saga.iterations, saga.seeds) == ("saga gm", [0, 10], 3)
    assert saga.values == pytest.approx([0.1, 0.92]) and saga.low == [0.1, 0.90] and saga.high == [0.1, 0.94]
    assert (sgd.column, sgd.values, sgd.low, sgd.high, sgd.seeds) == ("sgd gm", [0.1, 0.7], None, None, 1)
    assert [c.iterations for c in curves(runs, "none", "honest_variance")] == [[10], [10]]  # None is no point
    assert curves(runs, "gaussian", "test_accuracy") == []

    diverged = _fake_run(tmp_path / "div", "sgd", "mean", "sign-flip", 0.0)
    blown = [
        {"iteration": 0, "train_loss": 2.3, "test_accuracy": 0.1, "honest_variance": 1.0},
        {"iteration": 10, "train_loss": 1e300, "honest_variance": 1e300},
    ]
    (diverged / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in blown))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure(collect([tmp_path / "div"]), tmp_path / "div.png")
        plot_run(RunDirectory(diverged))
    assert (tmp_path / "div.png").stat().st_size > 10_000 and (diverged / "loss.png").exists()


def test_a_report_says_a_run_whose_process_died_left_no_record(tmp_path):
    """A summary saying 'running' is a running run only while a process holds the folder's lock; a run
    killed hard left it saying so forever, and the report showed it as running."""
    from byzflower.records.results import RunDirectory

    folder = _fake_run(tmp_path, "sgd", "gm", "none", 0.5, status="running")
    held = RunDirectory(folder)
    held.lock()
    assert table(collect([tmp_path]))[2][("none", "sgd gm")] == "running"
    held.unlock()
    assert table(collect([tmp_path]))[2][("none", "sgd gm")] == "no record"
    assert json.loads((folder / "summary.json").read_text())["status"] == "running"  # the folder is not edited


def test_a_rules_by_attacks_grid_reports_each_rules_worst_case_and_a_heatmap(tmp_path):
    from byzflower.experiments.report import worst_case

    for attack, acc in (("none", 0.95), ("gaussian", 0.9), ("sign-flip", 0.3), ("alie", 0.6)):
        _fake_run(tmp_path, "sgd", "gm", attack, acc)
    for attack, acc in (("none", 0.94), ("gaussian", 0.92), ("sign-flip", 0.8)):
        _fake_run(tmp_path, "sgd", "gm", attack, acc, pre="nnm")
    _fake_run(tmp_path, "sgd", "gm", "alie", 0.1, status="failed", pre="nnm")  # not counted, but listed
    _fake_run(tmp_path, "sgd", "krum", "gaussian", 0.5)  # one attack only: no worst case for it
    assert worst_case(collect([tmp_path])).splitlines()[2:] == [
        "| optimizer rule | no attack | worst under attack | by | attacks finished | not finished |",
        "|---|---|---|---|---|---|",
        "| sgd gm | 0.9500 | 0.3000 | sign-flip | 3 | - |",
        "| sgd nnm+gm | 0.9400 | 0.8000 | sign-flip | 2 | alie |",
    ]
    paths = write_report([tmp_path], tmp_path / "out")
    assert paths["worst"].read_text() == worst_case(collect([tmp_path]))
    assert paths["heatmap"].stat().st_size > 10_000
    assert worst_case([r for r in collect([tmp_path]) if r.column == "sgd krum"]) is None
    assert "detection" not in paths  # no run recorded detection
    metrics = tmp_path / "sgd-none-gm-sign-flip" / "metrics.jsonl"
    last = {"iteration": 20, "test_accuracy": 0.3, "detection_auc": 0.875, "detection_precision": 0.75}
    metrics.write_text(metrics.read_text() + json.dumps(last) + "\n")
    table_lines = write_report([tmp_path], tmp_path / "out")["detection"].read_text().splitlines()
    assert table_lines[2:] == ["| optimizer rule | sign-flip |", "|---|---|", "| sgd gm | 0.88 / 0.75 |"]


def test_the_cnn_and_fashion_mnist_plug_in(tmp_path):
    """Any torch model and the second data set run through the same estimators and rules."""
    cfg = resolve(
        {
            **RUN,
            "model": "cnn",
            "dataset": "fashion-mnist",
            "optimizer": "saga",
            "attack": "sign-flip",
            "aggregator": "gm",
            "num-server-rounds": 30,
            "eval-every": 30,
            "lr": 0.05,
            "eval-train-samples": 2000,
            "results-dir": str(tmp_path),
            "run-name": "cnn",
        }
    )
    summary = run_local(cfg, log=lambda _: None)
    records = _records(tmp_path / "cnn" / "metrics.jsonl")
    assert summary["status"] == "finished" and records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["honest_variance"] > 0


def test_a_stateful_rule_behind_nnm_keeps_its_state_across_a_resume(tmp_path, mnist):
    """Centred clipping starts from its previous aggregate; behind NNM that state must be in the
    checkpoint too (it used to be read from attributes of the outer rule only)."""
    from byzflower.engine import LocalRun

    overrides = {
        **RUN,
        "pre-aggregator": "nnm",
        "aggregator": "centered-clipping",
        "num-server-rounds": 20,
        "eval-every": 10,
        "checkpoint-every": 0,
        "results-dir": str(tmp_path),
    }
    straight = run_local(resolve({**overrides, "run-name": "straight"}), log=lambda _: None)
    cfg = resolve({**overrides, "run-name": "resumed"})
    first = LocalRun(cfg, log=lambda _: None)
    first.recorder.evaluate(0, first.x)
    for t in range(1, 11):
        first.step(t)
        if first.recorder.due(t):
            first.recorder.evaluate(t, first.x)
    assert set(first.rule.state_dict()) == {"previous"}
    first._checkpoint(10)
    first.run_dir.unlock()  # as if the process had been killed here
    second = LocalRun(cfg, log=lambda _: None)
    assert second.start == 11
    assert torch.equal(second.rule.state_dict()["previous"], first.rule.state_dict()["previous"])
    resumed = second.run()
    assert _records(tmp_path / "resumed" / "metrics.jsonl") == _records(tmp_path / "straight" / "metrics.jsonl")
    assert resumed["final"]["test_loss"] == straight["final"]["test_loss"]


def test_the_mechanism_table_and_figure_measure_spread_against_the_honest_mean(tmp_path):
    """For robust rules under identical copies: medians over the last third of the run of the honest
    spread, |m|, their ratio and |a - m| / |m|; the copies' distance factor per attack."""
    from byzflower.experiments.report import copies_distance_factor, mechanism

    for attack, spread, norm in (("none", 1.0, 0.14), ("sign-flip", 10.0, 2.0)):
        folder = _fake_run(tmp_path, "saga", "gm", attack, 0.6)
        records = [{"iteration": 0, "test_accuracy": 0.1}]
        for t in range(1, 10):  # the last third: iterations 7, 8, 9 (medians of 1x, 2x, 3x the value)
            k = 1 + (t % 3)
            records.append(
                {
                    "iteration": t,
                    "test_accuracy": 0.6,
                    "honest_variance": (k * spread) ** 2,
                    "honest_mean_norm": k * norm,
                    "aggregate_distance": 1.5 * k * norm,
                }
            )
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _fake_run(tmp_path, "saga", "mean", "sign-flip", 0.1)  # the mean is left out
    rows = mechanism(collect([tmp_path]), tmp_path / "m.png").splitlines()
    assert rows[4:] == [
        "| saga gm | none | 2 | 0.28 | 0.14 | 1.50 | 0.6000 |",
        "| saga gm | sign-flip | 20 | 4 | 0.20 | 1.50 | 0.6000 |",
    ]
    assert (tmp_path / "m.png").stat().st_size > 10_000
    assert copies_distance_factor({"attack": "sign-flip", "attack-scale": -3.0}) == 4.0
    assert copies_distance_factor({"attack": "zero-gradient", "num-honest": 50, "num-byzantine": 20}) == 3.5
    assert copies_distance_factor({"attack": "gaussian"}) is None
    assert mechanism([r for r in collect([tmp_path]) if r.config["attack"] == "none"], tmp_path / "n.png") is None


def test_the_engine_names_workers_by_the_role_blind_order_of_each_iteration(tmp_path):
    """The order that maps aggregated rows to workers (detection, Krum's selected worker) comes
    from the engine's blocks of positions: the seeded order of that very iteration, across blocks."""
    from byzflower.core import role_blind_order
    from byzflower.engine import LocalRun

    cfg = resolve({**RUN, "results-dir": str(tmp_path), "run-name": "order", "checkpoint-every": 0})
    run = LocalRun(cfg, log=lambda _: None)
    for t in (1, 2, 255, 256, 257, 600, 3):
        assert run._order(t) == role_blind_order(5, t, 13)
        positions = run._position(t)
        assert [int(positions[w]) for w in run._order(t)] == list(range(13))
    run.run_dir.unlock()


def test_the_convex_table_gives_gaps_at_the_middle_and_end_and_the_late_variance(tmp_path):
    """convex.md: per convex run the gap at the evaluation nearest the middle and at the last one,
    the final accuracy, and the geometric mean of the interval variances over the second half."""
    from byzflower.experiments.report import convex

    for attack in ("sign-flip", "none", "gaussian"):  # rows come in the attacks' order, not alphabetically
        folder = _fake_run(tmp_path, "saga", "gm", attack, 0.7)
        records = [{"iteration": 0, "test_accuracy": 0.1, "optimality_gap": 3.0}]
        for t, gap, variance in ((50, 1.0, 100.0), (100, 0.5, 10.0), (150, 0.2, 4.0), (200, 0.1, 1.0)):
            records.append(
                {"iteration": t, "test_accuracy": 0.7, "optimality_gap": gap, "honest_variance_interval_mean": variance}
            )
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _fake_run(tmp_path, "saga", "mean", "none", 0.9)  # no gap recorded: left out
    rows = convex(collect([tmp_path])).splitlines()
    assert rows[4:] == [  # gap at 100 and 200; sqrt(4 * 1)
        f"| saga gm | {attack} | 0.5 | 0.1 | 0.7000 | 2 |" for attack in ("none", "gaussian", "sign-flip")
    ]
    assert convex([r for r in collect([tmp_path]) if r.config["aggregator"] == "mean"]) is None
    from byzflower.experiments.report import beside_paper

    assert beside_paper(collect([tmp_path])) is not None  # saga gm / saga mean are Table I's columns
    for config in tmp_path.glob("*/config.json"):  # but not for logistic regression (Figs. 3-6)
        config.write_text(json.dumps({**json.loads(config.read_text()), "model": "logreg"}))
    assert beside_paper(collect([tmp_path])) is None


def test_one_saga_worker_in_the_engine_matches_a_centralised_loop(tmp_path, mnist):
    """One honest SAGA worker and the mean: the engine's model is a plain loop's x <- x - lr * message.
    (Flower's engine gives the engine's numbers: test_flower_app's parity tests, and bit for bit the
    deployment test, SAGA included.)"""
    from byzflower.factory import gradients_of, worker_data
    from clients.estimators import SAGA

    config = {"num-honest": 1, "num-byzantine": 0, "attack": "none", "aggregator": "mean", "optimizer": "saga"}
    cfg = resolve(
        {**config, "num-server-rounds": 12, "eval-every": 6, "seed": 3, "results-dir": str(tmp_path), "run-name": "one"}
    )
    assert run_local(cfg, log=lambda _: None)["status"] == "finished"
    grads = gradients_of(cfg, mnist, torch.device("cpu"))
    est = SAGA(grads, worker_data(cfg, mnist, [0], torch.device("cpu")), batch_size=1, seed=3)
    x = grads.initial_point()
    for t in range(1, 13):
        x = x - 0.1 * est.step(x, t)[0]
    engine = torch.load(tmp_path / "one" / "model.pt")
    assert torch.equal(grads.flatten(engine), x)
