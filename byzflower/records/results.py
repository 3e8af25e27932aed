"""Run folders: resolved config, metrics appended as they happen, a summary, figures."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from byzflower.atomic import DAMAGED_TORCH, FOREIGN_STATE


def default_results_dir() -> Path:
    """$BYZFLOWER_RESULTS_DIR, else ~/byzflower-results."""
    env = os.environ.get("BYZFLOWER_RESULTS_DIR")
    return Path(env).expanduser() if env else Path.home() / "byzflower-results"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def run_name(config: dict[str, Any]) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{config['optimizer']}-{config['aggregator']}-{config['attack']}-s{config['seed']}"


def status_of(exc: BaseException) -> tuple[str, str]:
    """(summary status, message) for a run that ended by ``exc``: a signal or Ctrl-C is an
    interruption, anything else a failure."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "interrupted", str(exc) or type(exc).__name__
    return "failed", f"{type(exc).__name__}: {exc}"


# keys that may change between a run and its resumption (and a folder moved elsewhere is the same run)
FREE_KEYS = frozenset({"checkpoint-every", "round-timeout", "min-workers", "cuda-graphs", "results-dir"})


def config_difference(there: dict[str, Any], wanted: dict[str, Any]) -> str:
    """The keys in which a run folder's config differs from the one asked for, in words ('' when the
    same run): 'num-server-rounds (4 there, 6 now), ...'. ``wanted``: a resolved config. A key that
    a folder from an older byzflower lacks counts as its default (what that version did)."""
    from byzflower.config import DEFAULTS

    wanted = json.loads(json.dumps(wanted))  # as config.json holds it (tuples as lists)
    there = {**json.loads(json.dumps({k: v for k, v in DEFAULTS.items() if k not in there})), **there}
    keys = sorted(k for k in set(there) | set(wanted) if k not in FREE_KEYS and there.get(k) != wanted.get(k))
    return ", ".join(f"{k} ({there.get(k)!r} there, {wanted.get(k)!r} now)" for k in keys)


def record_failure(run: RunDirectory, config: dict[str, Any], exc: BaseException) -> None:
    """A summary for a run that stopped before its recorder existed. A resumed run's folder keeps
    what its earlier summary said of the records there (iterations, final record, totals, warnings):
    only the status and the error are this attempt's."""
    status, error = status_of(exc)
    try:
        earlier = run.summary() or {}
    except RunFolderError:  # damaged: nothing in it to keep
        earlier = {}
    run.write_json("summary.json", {"iterations": 0, **earlier, "status": status, "error": error, "config": config})


def last_iteration(folder: RunDirectory) -> int | None:
    """The iteration of the run's last evaluation record (None: none, or unreadable records)."""
    try:
        records = folder.records()
    except RunFolderError:
        return None
    return records[-1]["iteration"] if records else None


def record_unended(folder: RunDirectory, error: str) -> dict[str, Any] | None:
    """Record as failed a run that ended without saying so: its summary still says 'running' and
    no process holds its folder (its process was killed). The summary keeps what it held, with
    the last evaluated iteration from the records (which stay: a named run resumes from its
    checkpoint). Returns the summary written, or None where the run recorded its end itself, is
    still held, or cannot be read or written."""
    try:
        if not folder.path.is_dir() or folder.held():
            return None
        summary = folder.summary()
        if summary is None or summary.get("status") != "running":
            return None
        summary = {**summary, "status": "failed", "error": error, "iterations": last_iteration(folder) or 0}
        folder.write_json("summary.json", summary)
    except (OSError, RunFolderError):
        return None
    return summary


class RunFolderError(RuntimeError):
    """A run folder cannot be used: another process holds it, or it holds another run."""


class DamagedRunFolder(RunFolderError):
    """A run folder's file does not hold what byzflower wrote there (a copy cut short, a disk fault, an edit)."""


def _damaged(path: Path, what: str) -> DamagedRunFolder:
    return DamagedRunFolder(f"{path} is damaged: {what}; move the run folder away (a sweep then runs it again)")


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"not text (byte {exc.start})") from None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise _damaged(path, f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"a JSON {type(data).__name__}, not an object")
    return data


_PID_MAX = 4_194_304  # Linux's largest pid_max (2**22)


class RunDirectory:
    """One run's folder: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``model.pt``, ``*.png``.

    A process that writes into a run folder holds an exclusive lock on it (``lock()``, released
    when the process ends, however it ends): a second process on the same folder is refused.
    """

    LOCK = ".lock"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    @classmethod
    def create(cls, root: str | Path, name: str, config: dict[str, Any]) -> RunDirectory:
        """A new folder ``root/name`` (``name-2``, ``name-3``, ... when taken), locked."""
        root = Path(root).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        suffix = 1
        path = root / name
        while True:
            try:
                path.mkdir()  # atomic: of two processes racing for one name, one gets it
                break
            except FileExistsError:  # never overwrite an earlier run
                suffix += 1
                path = root / f"{name}-{suffix}"
        run = cls(path)
        run.lock()
        run.write_json("config.json", config)
        return run

    def lock(self) -> None:
        """Take the folder's lock for the life of this process, or raise RunFolderError naming
        the process that holds it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another run (process {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    @contextlib.contextmanager
    def _peek(self):
        """(the lock file's descriptor, whether a process holds the lock now), or None without a lock
        file. Looking takes a shared lock for the instant of the block when none is held."""
        try:
            fd = os.open(self.path / self.LOCK, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = False
            except OSError:
                held = True
            yield fd, held
        finally:
            os.close(fd)  # (releases the shared lock, if it was taken)

    def holder(self) -> int | None:
        """The PID of the process that holds this folder's lock now, or None when none does (the
        PID written in the lock file is only trusted while the lock is held: a free lock's PID may
        have been reused)."""
        with self._peek() as peek:
            if peek is None or not peek[1]:
                return None
            fd = peek[0]
            # the holder writes its PID right after taking the lock: give it a moment to appear
            deadline = time.monotonic() + 1.0
            while not (text := os.pread(fd, 64, 0).decode(errors="replace").strip()) and time.monotonic() < deadline:
                time.sleep(0.01)
            # only what can be another process: a damaged file's 0 would signal our whole group, 1 init
            return int(text) if text.isdigit() and 1 < int(text) <= _PID_MAX else None

    def held(self) -> bool:
        """Whether some process holds this folder's lock now."""
        with self._peek() as peek:
            return peek is not None and peek[1]

    def begin(self, summary: dict[str, Any]) -> None:
        """Say in summary.json that the run is going (status 'running'): a summary left saying so
        by a process that no longer holds the lock is a run that ended without a record."""
        self.write_json("summary.json", {**summary, "status": "running", "pid": os.getpid()})

    def unlock(self) -> None:
        if self._lock_fd is not None:
            # a free lock's file names nobody, so the next holder's first instant shows no PID, not ours
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def write_json(self, filename: str, data: dict[str, Any]) -> None:
        tmp = self.path / f".{filename}.tmp"
        try:
            tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
            tmp.replace(self.path / filename)
        except OSError:  # a full disk: no half-written temporary file is left behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def append(self, record: dict[str, Any]) -> None:
        """Append one evaluation record to metrics.jsonl and flush it to disk at once."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_records(self, after: int) -> None:
        """Drop the records of iterations after ``after`` (a resumed run recomputes them)."""
        kept = [r for r in self.records() if r["iteration"] <= after]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(self.path / "metrics.jsonl")

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; a last line cut short (a killed run) is left out, any other line
        that is not a record raises DamagedRunFolder naming it."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        lines = [line for line in _text(path).splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:  # a record cut short by a kill: it is recomputed on resume
                    break
                raise _damaged(path, f"line {i + 1} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                raise _damaged(path, f"line {i + 1} is not an evaluation record")
            records.append(record)
        return records

    def config(self) -> dict[str, Any]:
        return _json_object(self.path / "config.json")

    def summary(self) -> dict[str, Any] | None:
        path = self.path / "summary.json"
        return _json_object(path) if path.exists() else None

    def load_torch(self, filename: str) -> Any:
        """What ``save_torch`` wrote; DamagedRunFolder where torch cannot read it back."""
        import torch

        path = self.path / filename
        try:
            return torch.load(path, weights_only=False)
        except DAMAGED_TORCH as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DamagedRunFolder(
                f"{path} is damaged: torch cannot read it back ({why}); move the run folder away (the run then "
                "starts over)"
            ) from None

    @contextlib.contextmanager
    def unlocked_on_error(self):
        """Release this process's lock on the folder if the block raises: a folder refused (another
        run's, damaged) must not stay held."""
        try:
            yield
        except BaseException:
            self.unlock()
            raise

    @contextlib.contextmanager
    def restoring(self, filename: str):
        """Around putting a checkpoint's state back: a state this code cannot take (a key missing, a
        shape changed: written by another version of byzflower) is one RunFolderError naming the file,
        not a KeyError or RuntimeError from deep inside the estimator or the rule."""
        try:
            yield
        except FOREIGN_STATE as exc:
            raise RunFolderError(
                f"{self.path / filename} holds a state this byzflower cannot put back ({type(exc).__name__}: "
                f"{exc}); written by another version? Finish the run with that version, or remove {filename} "
                "to start it over"
            ) from None

    def save_torch(self, filename: str, obj: Any) -> None:
        """``torch.save`` into the folder atomically (a kill never leaves half a file)."""
        import torch

        tmp = self.path / f".{filename}.tmp"
        torch.save(obj, tmp)
        tmp.replace(self.path / filename)

    def save_model(self, state_dict: dict[str, Any]) -> None:
        """The model's parameters (a torch state dict) as model.pt."""
        self.save_torch("model.pt", {k: v.detach().cpu().clone() for k, v in state_dict.items()})
