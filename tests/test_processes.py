"""The processes byzflower starts are stopped by PID, even when the process that started them dies
without stopping them (``byzflower.processes``). Stand-in programs named like Flower's
(scripts called ``flower-superlink`` and ``flwr-simulation``) make these checks quick; the real
SuperLink and simulation go through the same code in test_flower_app.py / test_deployment.py."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzflower.processes import OWNER_FILE, Watchdog, _alive, _terminate, _tree

# A stand-in: on SIGTERM it logs "<name> term <time>", waits ``linger`` s (a ServerApp writing its
# summary), logs "<name> exit <time>" and exits. ``child`` names a stand-in it starts first.
PROGRAM = """
import os, signal, subprocess, sys, time
log, linger, child = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
name = os.path.basename(sys.argv[0])
def say(what):
    with open(log, "a") as f:
        f.write(f"{name} {what} {time.monotonic()}\\n")
def stop(signum, frame):
    say("term")
    time.sleep(linger)
    say("exit")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
if child:
    subprocess.Popen([sys.executable, *child])
say("up")
while True:
    time.sleep(0.05)
"""


def _programs(folder: Path) -> dict[str, Path]:
    paths = {}
    for name in ("flower-superlink", "flwr-simulation"):
        paths[name] = folder / name
        paths[name].write_text(PROGRAM)
    return paths


def _superlink_command(folder: Path, log: Path) -> list[str]:
    """A stand-in SuperLink that starts a stand-in simulation (which takes 1 s to end on SIGTERM)."""
    p = _programs(folder)
    return [sys.executable, str(p["flower-superlink"]), str(log), "0", str(p["flwr-simulation"]), str(log), "1.0"]


def _events(log: Path) -> list[tuple[str, str, float]]:
    return [(n, w, float(t)) for n, w, t in (line.split() for line in log.read_text().splitlines())]


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _up(log: Path, count: int) -> None:
    _wait(lambda: log.exists() and sum(w == "up" for _, w, _ in _events(log)) == count)


def test_the_process_running_the_serverapp_is_stopped_before_the_rest(tmp_path):
    """SIGTERM goes to the simulation alone first, and the SuperLink is signalled only once it has
    ended: sent to both at once, Flower's simulation hung in Ray and never recorded its run's end."""
    log = tmp_path / "events"
    link = subprocess.Popen(_superlink_command(tmp_path, log), start_new_session=True)
    try:
        _up(log, 2)
        stopped = _terminate(lambda: _tree(link.pid), grace=15.0, poll=link.poll)
        link.wait(timeout=10)
    finally:
        if link.poll() is None:
            os.killpg(link.pid, signal.SIGKILL)
    events = {(n, w): t for n, w, t in _events(log)}
    assert events[("flwr-simulation", "exit")] - events[("flwr-simulation", "term")] >= 1.0  # it had its time
    assert events[("flower-superlink", "term")] >= events[("flwr-simulation", "exit")]
    assert link.pid in stopped and not any(_alive(p) for p in stopped)


OWNER = """
import json, os, subprocess, sys, time
from pathlib import Path
from byzflower.processes import OWNER_FILE, Watchdog
home, command = Path(sys.argv[1]), [a for a in sys.argv[2:] if a != "--fork"]
link = subprocess.Popen(command, start_new_session=True)
(home / "{owner_file}").write_text(json.dumps({{"owner": os.getpid(), "pids": [link.pid]}}))
watchdog = Watchdog(home, grace=15.0)
if "--fork" in sys.argv and os.fork() == 0:  # a child forked without exec lives on: it must not hide the death
    time.sleep(600)
print(link.pid, watchdog.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("fork", [False, True], ids=["alone", "with-a-forked-child"])
def test_what_a_process_killed_hard_started_is_stopped_at_once_by_its_watchdog(tmp_path, fork):
    """SIGKILL to the owner (no handler of its own runs): its watchdog stops what the home records,
    the ServerApp first, with SIGTERM (a run records itself interrupted), removes the home, says so
    on the owner's standard error and ends. A child the owner forked without exec (which inherits
    every open file) does not keep the watchdog waiting."""
    home, log = tmp_path / "byzflower-flwr-home", tmp_path / "events"
    home.mkdir()
    code = OWNER.format(owner_file=OWNER_FILE)
    command = [sys.executable, "-c", code, str(home), *_superlink_command(tmp_path, log), *(["--fork"] if fork else [])]
    owner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    link, watchdog = (int(p) for p in owner.stdout.readline().split())
    try:
        _up(log, 2)
        owner.kill()
        owner.wait(timeout=30)
        _wait(lambda: not _alive(watchdog) and not _alive(link))
    finally:
        for pid in (link, watchdog):
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)  # the forked child (in the owner's group)
    err = owner.stderr.read()
    events = [(n, w) for n, w, _ in _events(log)]
    assert events[-4:] == [
        ("flwr-simulation", "term"),
        ("flwr-simulation", "exit"),
        ("flower-superlink", "term"),
        ("flower-superlink", "exit"),
    ]
    assert not home.exists()
    assert f"process {owner.pid} ended without stopping what it started in {home}" in err
    assert str(link) in err and "removed the folder" in err


def test_a_released_watchdog_ends_and_touches_nothing(tmp_path):
    """``release()`` (the owner stopped everything itself): the watchdog ends at once, and neither the
    processes the home records nor the home are touched."""
    home, log = tmp_path / "byzflower-flwr-home", tmp_path / "events"
    home.mkdir()
    link = subprocess.Popen(_superlink_command(tmp_path, log), start_new_session=True)
    try:
        _up(log, 2)
        (home / OWNER_FILE).write_text(json.dumps({"owner": os.getpid(), "pids": [link.pid]}))
        watchdog = Watchdog(home)
        begin = time.monotonic()
        watchdog.release()
        assert watchdog.process.returncode == 0 and time.monotonic() - begin < 5
        assert _alive(link.pid) and home.exists()
        assert [w for _, w, _ in _events(log)] == ["up", "up"]  # no SIGTERM anywhere
    finally:
        os.killpg(link.pid, signal.SIGKILL)
        link.wait(timeout=10)


RENAMED_OWNER = """
import subprocess, sys, time
from pathlib import Path
from byzflower.processes import Watchdog, owner_record, write_owner, start_ticks
home, marker = Path(sys.argv[1]), sys.argv[2]
# two programs whose command lines do not name Flower (as Ray's services, which rename themselves)
ours, stranger = (subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(2))
then = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('ran')", marker]
record = owner_record([ours.pid, stranger.pid], then)
record["started"][str(stranger.pid)] += 1  # as if its PID had been recycled since: not ours
write_owner(home, record)
watchdog = Watchdog(home, grace=5.0)
print(ours.pid, stranger.pid, watchdog.process.pid, flush=True)
time.sleep(600)
"""


def test_a_watchdog_stops_the_very_processes_recorded_with_their_start_time_then_runs_its_command(tmp_path):
    """Processes that do not name Flower (a sweep's Ray services) are recorded with their start times:
    the watchdog of an owner killed hard stops the one whose start time matches, leaves alone a PID
    whose start time does not (a recycled PID is someone else's), then runs the record's command
    (a sweep's: record its runs as failed) and removes the home."""
    home, marker = tmp_path / "bzf-ray-home", tmp_path / "then-ran"
    home.mkdir()
    command = [sys.executable, "-c", RENAMED_OWNER, str(home), str(marker)]
    owner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ours, stranger, watchdog = (int(p) for p in owner.stdout.readline().split())
    try:
        record = json.loads((home / OWNER_FILE).read_text())
        assert record["pids"] == [ours, stranger] and record["owner"] == owner.pid
        owner.kill()
        owner.wait(timeout=30)
        _wait(lambda: not _alive(watchdog))
        assert not _alive(ours) and _alive(stranger)
        assert marker.read_text() == "ran" and not home.exists()
    finally:
        for pid in (ours, stranger, watchdog):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert f"stopped [{ours}] by PID and removed the folder" in owner.stderr.read()
