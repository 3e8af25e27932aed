"""The processes byzflower starts for Flower and Ray, found and stopped by PID (Linux /proc).

A SuperLink, its SuperNodes and a ``ray start`` each lead a session of their own (a terminal's
Ctrl-C must not reach them before byzflower has stopped the run), so nothing stops them when
the process that started them dies without doing it; nor does anything stop the services of the
Ray a sweep starts. Each is recorded in its home's ``owner.json``, and two things act on that
record: a ``Watchdog`` (a small process that stops them at once when their owner ends without
releasing it: SIGKILL, a crash, an exit that skipped ``stop()``), and ``reap_stale`` at the next
start (when the watchdog itself was killed too). A recorded PID is stopped only while it is still
the same process: one running Flower's programs (their command lines say so), or one whose start
time is recorded beside it (Ray's services rename themselves, e.g. ``ray::DashboardAgent``).

Standard library only: the watchdog runs this file as a script, and starts in tens of
milliseconds (no torch, no Flower, no byzflower import).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

OWNER_FILE = "owner.json"
HOME_PREFIX = "byzflower-flwr-"
#: what a watchdog's owner writes before it closes the pipe: it stopped everything itself
_RELEASE = b"released\n"


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); OSError when it is gone.
    The name is in parentheses and may hold spaces and ')', hence the split after the last one."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, ``_stat`` fields) of every process."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((int(entry.name), _stat(entry.name)))
            except OSError:
                continue
    return out


def _children(pid: int) -> list[int]:
    return [p for p, fields in _processes() if int(fields[1]) == pid]


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found.extend(kids)
        todo.extend(kids)
    return found


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' when it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_flower(pid: int) -> bool:
    """Whether ``pid`` still runs one of Flower's programs, or a program of a ``LocalRayCluster`` (whose
    command lines name its home, ``byzflower-flwr-...``): a recycled PID is left alone."""
    cmdline = _cmdline(pid)
    return "flower-" in cmdline or "flwr" in cmdline


#: the programs that run a ServerApp: stopped first, so the run records its end while the rest
#: (Ray, the ClientApps, the SuperLink it talks to) still stands
_SERVERAPP_PROGRAMS = frozenset({"flwr-simulation", "flwr-serverapp"})


def _runs_serverapp(pid: int) -> bool:
    """Whether ``pid`` is Flower's ``flwr-simulation`` or ``flwr-serverapp`` (run by a Python)."""
    return any(Path(arg).name in _SERVERAPP_PROGRAMS for arg in _cmdline(pid).split(" ")[:2])


def _group(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (Linux /proc): what a session leader we started
    left behind, even after it died and its children were reparented to PID 1."""
    return [p for p, fields in _processes() if int(fields[2]) == pgid and fields[0] != "Z"]


def _tree(pid: int) -> list[int]:
    """``pid``, its descendants and the rest of its process group (see ``_group``)."""
    return sorted({pid, *descendants(pid), *_group(pid)})


def start_ticks(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat's 22nd field): with the PID, the
    process's identity (a recycled PID starts later). OSError when it is gone."""
    return int(_stat(pid)[19])


def _same_process(pid: int, started: dict[str, int]) -> bool:
    """Whether ``pid`` is the process that ``started`` (PID -> start time) recorded."""
    try:
        return started.get(str(pid)) == start_ticks(pid)
    except OSError:
        return False


def _recorded(pids: list[int], started: dict[str, int] | None = None) -> list[int]:
    """The live processes of recorded leaders ``pids`` that are still ours (Flower's programs, or the
    very processes ``started`` records): each leader with its descendants, and what is left of its
    process group (the leader may be gone, its group not)."""
    started = started or {}

    def ours(p: int) -> bool:
        return _is_flower(p) or _same_process(p, started)

    found: set[int] = set()
    for pid in pids:
        if _alive(pid) and ours(pid):  # not a recycled PID
            found.update([pid, *descendants(pid)])
        found.update(p for p in _group(pid) if ours(p))
    return sorted(found)


def owner_record(pids: list[int], then: list[str] | None = None) -> dict:
    """``owner.json``'s content for processes this one started (``pids``, with their start times) and
    a ``Watchdog`` is to stop; ``then``: a command the watchdog runs after stopping them (e.g. to
    record in their run folders what happened to them). PIDs already gone are left out."""
    started = {}
    for pid in pids:
        try:
            started[str(pid)] = start_ticks(pid)
        except OSError:
            continue
    record: dict = {"owner": os.getpid(), "pids": [int(p) for p in started], "started": started}
    if then:
        record["then"] = list(then)
    return record


def write_owner(home: Path, record: dict) -> None:
    """Write ``owner.json`` whole or not at all: a watchdog reads it once its owner died, maybe mid-write."""
    path = Path(home) / OWNER_FILE
    tmp = path.with_name(f".{OWNER_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _terminate(tree: Callable[[], list[int]], grace: float, poll: Callable[[], object] = lambda: None) -> list[int]:
    """SIGTERM the processes ``tree()`` names, SIGKILL whatever is left after ``grace`` s (the
    tree read again: a process may have started one meanwhile). Returns every pid it signalled.

    Processes that run a ServerApp get SIGTERM first, and up to ``grace`` s to end, alone: given
    it with the rest, Flower's simulation hung in a Ray call to a raylet that was going away and
    never recorded how its run ended (SIGKILLed at the end of the grace, ``status: running``)."""

    def wait(pids: list[int]) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            poll()
            time.sleep(0.05)

    apps = [p for p in tree() if _runs_serverapp(p)]
    _signal(apps, signal.SIGTERM)
    wait(apps)
    pids = sorted(set(apps) | set(tree()))
    _signal([p for p in pids if _alive(p)], signal.SIGTERM)
    wait(pids)
    pids = sorted(set(pids) | set(tree()))
    _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    return pids


def _terminate_tree(*processes: subprocess.Popen, grace: float) -> list[int]:
    """SIGTERM ``processes``, their descendants and their process groups together (ServerApps
    first: ``_terminate``), SIGKILL whatever is left after ``grace`` s. Every process we start
    leads its own session, so its group also holds the children of a node that already died
    (reparented to PID 1, no longer its descendants).

    Returns every pid it signalled."""

    def tree() -> list[int]:
        return sorted({p for process in processes for p in _tree(process.pid)})

    def poll() -> None:
        for process in processes:
            process.poll()

    pids = _terminate(tree, grace, poll)
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return pids


def _signal(pids: list[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids`` (by PID; one already gone is skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def _owner(home: Path) -> dict | None:
    try:
        return json.loads((home / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def reap_stale(root: str | Path | None = None) -> list[str]:
    """Stop what a ``byzflower run`` killed hard left behind, and delete its folder.

    Every SuperLink home we create records its owner's PID and the PIDs it started. A home whose
    owner is gone has its processes (and their descendants) stopped by PID, if they are still
    Flower's, and is deleted with the worker state inside. Returns what was done, in words."""
    done = []
    for home in sorted(Path(root or tempfile.gettempdir()).glob(f"{HOME_PREFIX}*")):
        owner = _owner(home)
        if owner is None or _alive(int(owner.get("owner", 0))):
            continue
        stopped = _recorded([int(p) for p in owner.get("pids", [])], owner.get("started"))
        _signal(stopped, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
        done.append(f"removed {home} of a run whose process {owner.get('owner')} is gone; stopped {stopped}")
    return done


#: the write ends of this process's watchdogs' pipes: a child forked without exec (multiprocessing's
#: "fork", os.fork) would hold them open too, and its parent's death would go unseen while it lives
_WRITE_ENDS: set[int] = set()


def _close_write_ends() -> None:
    for fd in _WRITE_ENDS:
        os.close(fd)
    _WRITE_ENDS.clear()


os.register_at_fork(after_in_child=_close_write_ends)


class Watchdog:
    """A process that stops what ``home`` records (``owner.json``) when this process ends before
    ``release()``: SIGTERM, then SIGKILL after ``grace`` s, as ``stop()`` would (so a ServerApp
    still records its run as interrupted), then runs the record's ``then`` command if it has one
    (``owner_record``), and it deletes ``home`` when ``remove``.

    It holds the read end of a pipe whose only write end is here; the kernel closes that end
    however this process ends, SIGKILL included, and the watchdog wakes on the end of file. A
    ``release()`` writes a word first: the owner stopped everything itself, nothing is done.
    The watchdog leads its own session (a terminal's Ctrl-C goes to its owner, which stops the
    run and releases it) and writes what it did to the owner's standard error.
    """

    def __init__(self, home: Path, grace: float = 15.0, remove: bool = True) -> None:
        read, self._write = os.pipe()  # not inherited by the other processes we start (close_fds)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-S", str(Path(__file__).resolve()), str(home), repr(float(grace)), str(int(remove))],
                stdin=read,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(self._write)
            raise
        finally:
            os.close(read)
        _WRITE_ENDS.add(self._write)
        self._owner = os.getpid()

    def release(self) -> None:
        """Tell the watchdog that everything was stopped, and wait for it to end."""
        if self._write is None or os.getpid() != self._owner:  # (a forked child's copy: its end is closed)
            return
        _WRITE_ENDS.discard(self._write)
        try:
            os.write(self._write, _RELEASE)
        except OSError:  # it died: nothing listens
            pass
        os.close(self._write)
        self._write = None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _watch(home: Path, grace: float, remove: bool) -> None:
    said = b""
    while chunk := os.read(0, 64):  # until every write end is closed
        said += chunk
    if said.endswith(_RELEASE):
        return
    owner = _owner(home) or {}
    stopped = _terminate(lambda: _recorded([int(p) for p in owner.get("pids", [])], owner.get("started")), grace)
    if owner.get("then"):  # e.g. record in run folders that their runs were stopped
        try:
            subprocess.run(owner["then"], stdin=subprocess.DEVNULL, stdout=sys.stderr, timeout=300, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    if remove:
        shutil.rmtree(home, ignore_errors=True)
    try:
        print(
            f"[byzflower] process {owner.get('owner')} ended without stopping what it started in {home}: "
            f"stopped {stopped} by PID{' and removed the folder' if remove else ''}",
            file=sys.stderr,
            flush=True,
        )
    except OSError:  # its terminal may be gone with it
        pass


if __name__ == "__main__":
    _watch(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1")
