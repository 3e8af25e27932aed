"""Sweeps: one run per optimizer x aggregator x attack, skip what is finished, keep going past failures.

Runs go to ``<out>/<optimizer>-<aggregator>-<attack>/`` (run-name), so running the same sweep
again skips the finished ones and resumes interrupted ones from their checkpoints. ``--jobs N``
runs N at once in N local processes, or through Ray (already a Flower dependency) across a Ray
cluster given its address (the output folder must then be on storage every node sees), or on this
machine with ``backend='ray'``. Local processes are the default because their stop is exact: each
gets SIGINT directly (a Ray task's cancel did not always reach a long run; see ``_ray_runs``). On a
GPU the N runs share it (each a 1/N share under Ray): a GPU iteration leaves the device mostly
idle, so several runs fill it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byzflower.config import AGGREGATORS, ATTACKS, OPTIMIZERS, ConfigError, resolve
from byzflower.processes import Watchdog, descendants, owner_record, write_owner
from byzflower.ray_address import private_ray_tmpdir
from byzflower.records.results import RunDirectory, RunFolderError, config_difference, last_iteration

AXES = {"optimizer": OPTIMIZERS, "aggregator": AGGREGATORS, "attack": ATTACKS}
BACKENDS = ("auto", "ray", "processes")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep; ``seed`` None: the run config's seed (the folder's name then has none)."""

    optimizer: str
    aggregator: str
    attack: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.aggregator}-{self.attack}" + ("" if self.seed is None else f"-s{self.seed}")


def parse_axis(name: str, text: str) -> list[str]:
    """'sgd, saga' -> ['sgd', 'saga'], checked against the valid choices; 'all' -> every choice."""
    if text.strip() == "all":
        return list(AXES[name])
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--{name} is empty; give one or more of: {', '.join(AXES[name])}")
    bad = [v for v in values if v not in AXES[name]]
    if bad:
        raise ConfigError(f"--{name}: {', '.join(map(repr, bad))} not valid; choose from: {', '.join(AXES[name])}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"--{name} repeats {', '.join(repeated)}")
    return values


def parse_seeds(text: str) -> list[int]:
    """'1, 2, 3' -> [1, 2, 3] (the sweep's ``--seed``: replicates of every cell), checked like the config's seed."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError("--seed is empty; give one or more integer seeds, e.g. 1,2,3")
    bad = [v for v in values if not v.isdigit()]
    if bad:
        raise ConfigError(f"--seed: {', '.join(map(repr, bad))} not a seed; give integers >= 0, e.g. 1,2,3")
    seeds = [int(v) for v in values]
    repeated = sorted({v for v in seeds if seeds.count(v) > 1})
    if repeated:
        raise ConfigError(f"--seed repeats {', '.join(map(str, repeated))}")
    for seed in seeds:
        resolve({"seed": seed})  # the config's own range check, named the same way
    return seeds


def grid(
    optimizers: list[str], aggregators: list[str], attacks: list[str], seeds: list[int] | None = None
) -> list[Cell]:
    """Every combination, seeds innermost (a cell's replicates run one after another)."""
    return [Cell(*c) for c in itertools.product(optimizers, aggregators, attacks, seeds or [None])]


def cell_config(cell: Cell, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    return {
        **overrides,
        "optimizer": cell.optimizer,
        "aggregator": cell.aggregator,
        "attack": cell.attack,
        **({} if cell.seed is None else {"seed": cell.seed}),
        "results-dir": str(out),
        "run-name": cell.name,
    }


def validate(cells: list[Cell], overrides: dict[str, Any], out: Path) -> None:
    """Every cell's config, checked before anything runs (all problems at once)."""
    from byzflower.factory import preflight

    problems = []
    for cell in cells:
        try:
            cfg = resolve(cell_config(cell, overrides, out))
            preflight(cfg)
        except ConfigError as exc:
            problems.append(f"{cell.name}: {str(exc).removeprefix('invalid run config:').strip()}")
            continue
        folder = RunDirectory(out / cell.name)
        if (folder.path / "config.json").exists():  # a run there: it must be this cell's, finished or not
            differs = config_difference(folder.config(), cfg.resolved())
            if differs:
                problems.append(
                    f"{cell.name}: {folder.path} holds a run with another config, differing in {differs}; "
                    "use another --out or move that folder away"
                )
    if problems:
        raise ConfigError("invalid sweep:\n" + "\n".join(problems))


def status_of(out: Path, cell: Cell) -> str | None:
    """The cell's run's status from its summary.json (None: none yet); DamagedRunFolder if unreadable."""
    summary = RunDirectory(out / cell.name).summary()
    return None if summary is None else summary.get("status")


_STOP: Any = None  # in a sweep's run process: the parent's "stop" event


def _interrupt(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_cell(
    config: dict[str, Any], threads: int | None = None, quiet: bool = False, task: bool = False
) -> dict[str, Any]:
    """Run one cell with the local engine; never raises (a failure is recorded and returned).

    ``task``: run as a Ray task, which a sweep stops with ``ray.cancel`` (Python's SIGINT handler,
    raised in the worker's main thread). A worker that inherited SIGINT ignored (a Ray started
    from a background job of a script) would never see it: measured, the runs went on."""
    if task and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return _run_cell(config, threads, quiet)
        finally:
            signal.signal(signal.SIGINT, previous)
    if _STOP is None:
        return _run_cell(config, threads, quiet)
    if _STOP.is_set():  # started just before the sweep was stopped
        return {"name": config["run-name"], "status": "not started"}
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return _run_cell(config, threads, quiet)
    except KeyboardInterrupt:
        return {"name": config["run-name"], "status": "interrupted"}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_cell(config: dict[str, Any], threads: int | None, quiet: bool) -> dict[str, Any]:
    import torch

    from byzflower.engine import run_local

    if threads:
        torch.set_num_threads(threads)
    name = config["run-name"]
    total = config.get("num-server-rounds")

    def log(line: str) -> None:
        if not quiet:
            print(f"  [{name}] {line}", flush=True)

    start = time.perf_counter()
    try:
        summary = run_local(resolve(config), log=log)
        return {
            "name": name,
            "status": summary.get("status"),
            "wall_s": time.perf_counter() - start,
            "test_accuracy": summary.get("final", {}).get("test_accuracy"),
            "total": total,
        }
    except RunFolderError as exc:  # the folder is not this run's to write in (in use, damaged): said, left alone
        error = f"{type(exc).__name__}: {exc}"
        log(error)
        return {"name": name, "status": "failed", "error": error, "wall_s": time.perf_counter() - start}
    except Exception as exc:  # a failing run is recorded, the sweep goes on
        error = f"{type(exc).__name__}: {exc}"
        folder = Path(config["results-dir"]) / name
        folder.mkdir(parents=True, exist_ok=True)
        summary_path = folder / "summary.json"
        try:
            if not summary_path.exists() or json.loads(summary_path.read_text()).get("status") != "failed":
                summary_path.write_text(
                    json.dumps({"status": "failed", "error": error, "traceback": traceback.format_exc()})
                )
        except (OSError, ValueError) as unrecorded:  # a full disk, a damaged summary: said, and the sweep goes on
            log(
                f"could not record the failure in {summary_path}: {getattr(unrecorded, 'strerror', None) or unrecorded}"
            )
        return {"name": name, "status": "failed", "error": error, "wall_s": time.perf_counter() - start}


def _uses_gpu(overrides: dict[str, Any]) -> bool:
    """Whether the sweep's runs will compute on this machine's GPU."""
    device = overrides.get("device", "auto")
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _ray_runs(jobs: int, ray_address: str | None, gpu: bool, grace: float):
    """(submit(config) -> handle, wait(handles) -> (handle, outcome) | None after 30 s) through Ray."""
    import ray

    threads = max(1, (os.cpu_count() or 1) // jobs) if ray_address is None else None
    owns = not ray.is_initialized()
    # the Ray this sweep starts keeps its session files (logs, sockets) in a folder of its own,
    # deleted when it stops, instead of leaving them in the machine's /tmp/ray
    starts = owns and not ray_address
    files = tempfile.TemporaryDirectory(prefix="bzf-ray-", ignore_cleanup_errors=True) if starts else None
    private = private_ray_tmpdir(files.name) if files is not None else None
    if owns:
        with _signal_handlers_kept():
            ray.init(  # "local": a new Ray for this sweep, never a cluster some `ray start` left recorded
                address=ray_address or "local",
                num_cpus=None if ray_address else jobs,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
                **({"_temp_dir": str(Path(private) / "ray")} if private else {}),
            )
    watchdog, folders = None, []
    if starts:  # its services outlive a sweep killed hard (an agent for minutes): a watchdog stops them
        home, services = Path(files.name), descendants(os.getpid())

        def own() -> None:  # after stopping them, the watchdog records the runs that ended with them
            write_owner(home, owner_record(services, [sys.executable, "-c", _RECORD_UNENDED, _ROOT, *folders]))

        own()
        watchdog = Watchdog(home, grace=5.0)  # Ray's agents ignore SIGTERM: they get SIGKILL after the grace
    # Ray hides the GPUs from tasks that ask for none: a GPU sweep asks for a 1/jobs share each.
    # No retries: a run whose worker dies is reported as failed (Ray would rerun it unsaid).
    remote = ray.remote(num_cpus=1, num_gpus=1.0 / jobs if gpu else 0, max_retries=0)(run_cell)
    handles: list = []
    configs: dict[Any, dict[str, Any]] = {}

    def submit(config: dict[str, Any]) -> Any:
        if watchdog is not None:
            folders.append(str(Path(config["results-dir"]) / config["run-name"]))
            own()
        handles.append(remote.remote(config, threads, True, True))
        configs[handles[-1]] = config
        return handles[-1]

    def wait(pending: list) -> tuple[Any, dict[str, Any]] | None:
        ready, _ = ray.wait(pending, num_returns=1, timeout=30.0)
        if not ready:
            return None
        try:
            return ready[0], ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # its worker died (out of memory, a crash); run_cell never raises
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return ready[0], lost_run(configs[ready[0]], f"its Ray worker was lost ({type(exc).__name__}: {cause})")

    try:
        yield submit, wait
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error): queued runs are dropped (the last submitted first, so
        # none starts in a slot a cancelled run frees) and running ones get a KeyboardInterrupt in
        # their task; they record it, and are waited for, before Ray stops (a later sweep resumes them).
        for handle in reversed(handles):
            ray.cancel(handle)
        _, running = ray.wait(handles, num_returns=len(handles), timeout=min(_CANCEL_GRACE_S, grace))
        if running:
            if ray_address is None:
                # A cancel is Ray's interrupt_main() in the task's worker, which does nothing where
                # SIGINT is ignored (run_cell sets its handler; code it runs may change it). The
                # run's own lock names its process here, and SIGINT reaches it as Ctrl-C would.
                interrupt_runs([Path(configs[h]["results-dir"]) / configs[h]["run-name"] for h in running])
            ray.wait(running, num_returns=len(running), timeout=grace)  # then Ray's shutdown ends them
        raise
    finally:
        try:
            if owns:
                ray.shutdown()
        finally:
            if watchdog is not None:
                watchdog.release()
            if files is not None:
                files.cleanup()


_CANCEL_GRACE_S = 15.0  # how long a cancelled Ray run has before it gets SIGINT from the sweep
_ROOT = str(Path(__file__).resolve().parents[2])  # where ``byzflower`` imports from, for the watchdog's command
# What a sweep's watchdog runs once it has stopped the sweep's Ray (argv: ROOT FOLDER...): each run
# whose summary still says 'running' and whose folder no process holds is recorded as failed.
_RECORD_UNENDED = """
import sys
sys.path.insert(0, sys.argv[1])
from byzflower.records.results import RunDirectory, record_unended
WHY = "its sweep ended without stopping it (SIGKILL or a crash), and its Ray with it"
for folder in sys.argv[2:]:
    if record_unended(RunDirectory(folder), WHY):
        print(f"[byzflower] {folder}: failed (its sweep ended without stopping it)", file=sys.stderr, flush=True)
"""


def interrupt_runs(folders: list[Path]) -> list[int]:
    """SIGINT to each process that holds one of these run folders now; returns their PIDs."""
    pids = []
    for folder in folders:
        pid = RunDirectory(folder).holder()
        if pid is not None and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)
                pids.append(pid)
    return pids


def stop_record(folder: Path) -> dict[str, Any]:
    """What a stopped run left in its folder: its summary's status and last evaluated iteration,
    'not started' when it has no records, or 'no record' when its summary still says 'running' (or
    is missing) and no process holds the folder: it ended without writing one."""
    run = RunDirectory(folder)
    summary = run.summary() if run.path.exists() else None
    if summary is None and not (run.path / "metrics.jsonl").exists():
        return {"name": run.path.name, "status": "not started"}
    summary = summary or {}
    status = summary.get("status", "running")
    iterations = summary.get("iterations")
    if status == "running":  # the summary's figure is from the run's start: the records say how far it got
        iterations = last_iteration(run)
        if run.holder() is None:
            status = "no record"
    return {"name": run.path.name, "status": status, "iterations": iterations}


@contextlib.contextmanager
def _signal_handlers_kept():
    """Keep this process's Python handlers of SIGINT, SIGTERM and SIGHUP across the block.

    ``ray.init`` replaces them in a driver: SIGTERM then goes to Ray's own handler (``sys.exit``)
    behind abseil's failure handler, which aborts the process 3 s later, before the runs could
    record that they were interrupted (measured: a stopped sweep's runs had no summary)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@dataclass(eq=False)
class _Job:
    """One run of a process sweep: its config, then (once started) its process and the pipe its
    outcome comes back through."""

    config: dict[str, Any]
    process: Any = None
    outcome: Any = None  # the parent's end of the pipe


def _job_main(outcome: Any, config: dict[str, Any], threads: int, stop: Any) -> None:
    """A sweep's run in a process of its own: the outcome goes back through the pipe.

    Ctrl-C is ignored outside the run (the terminal sends it to the whole process group, and the
    parent stops the sweep); during the run the first SIGINT interrupts it, which records itself
    as interrupted, and later ones are ignored so that record is written whole (``run_cell``)."""
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _interrupt_when_orphaned():  # the sweep is gone already: the run does not start
        return
    result = run_cell(config, threads, True)
    with contextlib.suppress(OSError):  # the sweep is gone: the run's own records say how it ended
        outcome.send(result)
        outcome.close()


def _interrupt_when_orphaned() -> bool:
    """SIGINT to this process when the sweep that started it dies, however it dies (SIGKILL too):
    the run then records that it was interrupted and ends, instead of going on with no one to wait
    for it (Linux's PR_SET_PDEATHSIG; elsewhere nothing is done). False: the sweep is gone already."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGINT), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return True
    parent = multiprocessing.parent_process()
    return parent is None or os.getppid() == parent.pid


def _ended_without_outcome(job: _Job) -> dict[str, Any]:
    """The outcome of a run whose process ended without sending one (killed by a signal, e.g. the
    system's out-of-memory killer's SIGKILL, or exited from native code)."""
    job.process.join(5.0)
    code = job.process.exitcode
    if code is not None and code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        oom = " (what the system's out-of-memory killer sends)" if -code == signal.SIGKILL else ""
        cause = f"its process was killed by {signame}{oom}"
    else:
        cause = f"its process exited with code {code}"
    return lost_run(job.config, f"{cause} before the run finished")


def lost_run(config: dict[str, Any], error: str) -> dict[str, Any]:
    """A run whose process was lost before it returned: recorded as failed in its summary (with
    the last evaluated iteration from its records, which stay: a later sweep resumes it from its
    checkpoint), unless it had already recorded that it finished."""
    name = config["run-name"]
    folder = RunDirectory(Path(config["results-dir"]) / name)
    iterations = None
    try:
        if folder.path.exists() and not folder.held():
            earlier = folder.summary() or {}
            if earlier.get("status") == "finished":  # it ended after its last word: nothing lost
                return {
                    "name": name,
                    "status": "finished",
                    "test_accuracy": earlier.get("final", {}).get("test_accuracy"),
                }
            iterations = last_iteration(folder)
            folder.write_json(
                "summary.json", {**earlier, "status": "failed", "error": error, "iterations": iterations or 0}
            )
    except (OSError, RunFolderError):  # a full disk, a damaged folder: the sweep's record still says it
        pass
    return {"name": name, "status": "failed", "error": error, "iterations": iterations}


@contextlib.contextmanager
def _process_runs(jobs: int, ray_address: str | None, gpu: bool, grace: float):
    """The same through local processes, one per run and ``jobs`` at a time (spawned: each has
    its own CUDA context). A run's process that dies (a SIGKILL from the out-of-memory killer)
    fails that run alone: its outcome and summary say how it ended, and the others go on."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    queued: list[_Job] = []
    running: list[_Job] = []

    def submit(config: dict[str, Any]) -> _Job:
        queued.append(_Job(config))
        return queued[-1]

    def start_queued() -> None:
        while queued and len(running) < jobs:
            job = queued.pop(0)
            job.outcome, sender = context.Pipe(duplex=False)
            job.process = context.Process(target=_job_main, args=(sender, job.config, threads, stop))
            # Ctrl-C in the terminal reaches the whole group: the new process starts with it
            # ignored (as the sweep's own handler then stops the runs), not mid-import
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                job.process.start()
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
            sender.close()
            running.append(job)

    def wait(handles: list) -> tuple[Any, dict[str, Any]] | None:
        start_queued()
        ready = multiprocessing.connection.wait([job.outcome for job in running], timeout=30.0)
        if not ready:
            return None
        job = next(job for job in running if job.outcome in ready)
        running.remove(job)
        try:
            outcome = job.outcome.recv()
        except EOFError:  # the process ended without sending it
            outcome = _ended_without_outcome(job)
        job.outcome.close()
        job.process.join(60.0)
        if job.process.is_alive():  # sent its outcome but does not exit: not left behind
            job.process.kill()
            job.process.join()
        return job, outcome

    try:
        yield submit, wait
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error): queued runs never start and running ones are
        # interrupted (they record it; a later sweep resumes them).
        stop.set()
        queued.clear()
        for job in running:
            with contextlib.suppress(OSError):
                os.kill(job.process.pid, signal.SIGINT)
        # A run that does not end within the grace (its code ignores SIGINT, or hangs) is killed,
        # so the sweep always ends; its stop report then says it left no record.
        deadline = time.monotonic() + grace
        for job in running:
            job.process.join(max(0.0, deadline - time.monotonic()))
        for job in running:
            if job.process.is_alive():
                job.process.kill()
        raise
    finally:
        for job in running:
            job.process.join()
            job.outcome.close()


def _bar(done: int, total: int, started: float, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done) if done else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs, elapsed {elapsed / 60:.1f} min, ETA {eta_text}"
    )


def _progress(out: Path, cells: list[Cell]) -> str:
    """The running cells' latest evaluated iterations (queued ones have no records yet)."""
    parts = []
    for cell in cells:
        path = out / cell.name / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            parts.append(f"{cell.name} at {json.loads(lines[-1])['iteration']}")
    return ", ".join(parts) or "starting"


def run_sweep(
    cells: list[Cell],
    overrides: dict[str, Any],
    out: Path,
    jobs: int = 1,
    ray_address: str | None = None,
    say: Callable[[str], None] | None = None,
    backend: str = "auto",
    stop_grace: float = 120.0,
) -> list[dict[str, Any]]:
    """Run every unfinished cell; returns one outcome per cell (also written to ``out/sweep.json``).

    Stopped (Ctrl-C, SIGTERM), the running runs are interrupted and have ``stop_grace`` seconds to
    record it; one still going after that is killed (jobs > 1), and the stop report says so.

    ``backend`` (with jobs > 1): 'ray', 'processes' (local processes), or 'auto' (Ray when
    ``ray_address`` names a cluster, local processes otherwise)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "ray" if ray_address else "processes"
    if not stop_grace > 0:
        raise ConfigError(f"--stop-grace={stop_grace} must be > 0 seconds")
    if jobs < 1:
        raise ConfigError(f"--jobs={jobs} must be >= 1 (1: one run at a time, in this process)")
    if backend == "processes" and ray_address:
        raise ConfigError("--ray-address needs backend 'ray' (or 'auto')")
    if ray_address is not None and jobs > 1:  # else Ray waits minutes on an address where nothing answers
        from byzflower.ray_address import check_ray_option

        check_ray_option(ray_address)
    if say is None:

        def say(line: str) -> None:
            print(line, flush=True)  # flushed: progress must show when the output is a file or a pipe

    out = Path(out).expanduser().resolve()
    validate(cells, overrides, out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if status_of(out, c) != "finished"]
    outcomes = {c.name: {"name": c.name, "status": "finished", "skipped": True} for c in cells if c not in todo}
    say(f"sweep: {len(cells)} runs in {out}; {len(cells) - len(todo)} already finished, {len(todo)} to run")
    started = time.perf_counter()
    done = 0
    try:
        jobs = min(jobs, len(todo))  # more slots than runs would only thin each run's threads and GPU share
        if jobs <= 1:
            for cell in todo:
                say(_bar(done, len(todo), started) + f" | running {cell.name}")
                outcomes[cell.name] = run_cell(cell_config(cell, overrides, out))
                done += 1
        else:
            launch = _ray_runs if backend == "ray" else _process_runs
            with launch(jobs, ray_address, _uses_gpu(overrides), stop_grace) as (submit, wait):
                pending = {submit(cell_config(c, overrides, out)): c for c in todo}
                while pending:
                    ready = wait(list(pending))
                    if ready is None:  # per-run progress, read from the runs' own records
                        say(_bar(done, len(todo), started) + " | " + _progress(out, list(pending.values())))
                        continue
                    handle, outcome = ready
                    cell = pending.pop(handle)
                    outcomes[cell.name] = outcome
                    done += 1
                    why = f" ({outcome['error'][:300]})" if outcome.get("error") else ""
                    say(_bar(done, len(todo), started) + f" | {cell.name}: {outcome['status']}{why}")
    except BaseException:
        # Stopped: by now the runs have been interrupted and waited for. Say what each unfinished
        # one left, in the log and in sweep.json, so a run that ended without a record is seen.
        for cell in todo:
            if cell.name not in outcomes:
                outcomes[cell.name] = stop_record(out / cell.name)
                record = outcomes[cell.name]
                at = (
                    f" (last evaluated iteration {record['iterations']})"
                    if record.get("iterations") is not None
                    else ""
                )
                note = "; it ended without writing one" if record["status"] == "no record" else ""
                say(f"stopped: {cell.name} {record['status']}{at}{note}")
        _write_outcomes(out, [outcomes[c.name] for c in cells])
        raise
    say(_bar(done, len(todo), started) + " | done")
    result = [outcomes[c.name] for c in cells]
    _write_outcomes(out, result)
    failed = [o["name"] for o in result if o.get("status") != "finished"]
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their summary.json)")
    return result


def _write_outcomes(out: Path, outcomes: list[dict[str, Any]]) -> None:
    (out / "sweep.json").write_text(json.dumps(outcomes, indent=2) + "\n")
