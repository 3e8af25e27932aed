"""Run the Flower app through a real SuperLink that we start, watch and stop by PID.

``flwr run .`` would start a detached local SuperLink that outlives the command; here the
SuperLink (simulation mode) gets free ports and a private FLWR_HOME, runs with runtime
dependency installation off (so no per-run ``uv sync`` pulls another torch), and is stopped,
with everything it spawned, when the block ends; by its watchdog (``processes.Watchdog``) if
this process dies first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byzflower.flower.credentials import Credentials, make_credentials
from byzflower.processes import (  # noqa: F401 - reap_stale, descendants, _alive: this module's API too
    HOME_PREFIX,
    Watchdog,
    _alive,
    _signal,
    _terminate_tree,
    _tree,
    descendants,
    reap_stale,
    write_owner,
)
from byzflower.ray_address import check_ray_address, private_ray_tmpdir
from byzflower.records.results import RunDirectory, record_unended


def toml_value(value: Any) -> str:
    """A run-config value as the TOML that ``--run-config`` expects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def toml_assignments(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@dataclass
class RunOutcome:
    returncode: int
    run_id: int | None
    status: str | None  # e.g. "finished:completed", "finished:failed"
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.status) and self.status.endswith("completed")


#: in the last line of every byzflower run that ends (``ending_line``)
ENDING = ": final test accuracy "
#: lines that ``flwr log`` / ``flwr run`` print themselves, not the run's log
_CLI_LINES = ("logstream for run_id", "Using SuperLink")


def missing_tail(streamed: str, stored: str) -> list[str]:
    """The lines of ``stored`` (a run's whole log) from the first one that ``streamed`` lacks, in
    order, matching stored lines against streamed ones in order (the stream holds the log's lines
    with the CLI's own in between, up to where it was cut). The CLI's own lines aside."""
    shown = [line for line in stored.splitlines(keepends=True) if not any(m in line for m in _CLI_LINES)]
    seen = streamed.splitlines(keepends=True)
    j = 0
    for i, line in enumerate(shown):
        while j < len(seen) and seen[j].rstrip("\n") != line.rstrip("\n"):
            j += 1
        if j == len(seen):
            return [x if x.endswith("\n") else x + "\n" for x in shown[i:]]
        j += 1
    return []


_RESULTS = re.compile(r"\[byzflower\] results: (.+?)\s*$", re.MULTILINE)  # the ServerApp's first line


def unended_lines(output: str, status: str) -> list[str]:
    """A run that Flower says ended (``status``, not completed) but whose folder still says 'running',
    held by no process: its ServerApp's process was killed (by the out-of-memory killer, say) and
    could not record it. It is recorded as failed (``record_unended``); returns the log line that
    says so ([] where the run recorded its end itself, or never reached its folder)."""
    found = _RESULTS.search(output)
    if not found:
        return []
    folder = RunDirectory(Path(found[1]))
    error = f"the ServerApp's process ended without recording how the run ended (Flower: {status}); was it killed?"
    summary = record_unended(folder, error)
    if summary is None:
        return []
    where = folder.path / "summary.json"
    return [f"[byzflower] {error} Recorded as failed after iteration {summary['iterations']} in {where}\n"]


class LocalSuperLink:
    """A SuperLink on a free port, in simulation mode unless told otherwise; a context manager."""

    simulation = True

    def __init__(
        self,
        home: str | Path | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        ray_address: str | None = None,
    ) -> None:
        if ray_address is not None:
            check_ray_address(ray_address)
        self.cwd = cwd  # where the SuperLink, and so the ServerApps it runs, work (None: here)
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix=HOME_PREFIX)
        self.home = Path(home or self._tmp.name)
        self.port = _free_port()
        self.name = "byzflower"
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # the SuperLink spawns flower-superexec / flwr-simulation by name
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **(env or {}),
        }
        # Flower's simulation joins the cluster at ray_address (or $RAY_ADDRESS, Ray's own variable)
        # instead of starting Ray per run. Without either, "local" makes it start its own even where a
        # `ray start` left its address recorded (/tmp/ray/ray_current_cluster), which ray.init() would
        # otherwise join, dead or alive.
        self.env["RAY_ADDRESS"] = ray_address or self.env.get("RAY_ADDRESS") or "local"
        if self.env["RAY_ADDRESS"] == "local" and (ray_tmp := private_ray_tmpdir(self.home, self.env)):
            self.env["RAY_TMPDIR"] = ray_tmp  # the Ray the run starts keeps its session files here, deleted with it
        # worker state lives in this home, so it goes with it (and with a stale home, see reap_stale)
        self.env.setdefault("BYZFLOWER_STATE_DIR", str(self.home / "node-state"))
        self.process: subprocess.Popen | None = None
        self.watchdog: Watchdog | None = None
        self.pids: set[int] = set()
        self.current_run: int | None = None  # the id of the run ``run`` streams, as soon as it is known
        self.credentials: Credentials | None = None  # TLS files, when the SuperLink uses TLS

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _security_args(self) -> tuple[list[str], str]:
        """(SuperLink flags, the CLI connection's security line)."""
        return ["--insecure"], "insecure = true"

    def _healthy(self) -> bool:
        ca = self.credentials
        if ca is None:
            url, context = f"http://127.0.0.1:{self.port}/health", None
        else:
            url, context = f"https://127.0.0.1:{self.port}/health", ssl.create_default_context(cafile=str(ca.ca_cert))
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return r.status == 200

    def _remember(self, pid: int) -> None:
        """Note a process we started, on disk too: if this process dies hard, the next start stops it."""
        self.pids.add(pid)
        write_owner(self.home, {"owner": os.getpid(), "pids": sorted(self.pids)})

    def start(self, timeout: float = 60.0) -> None:
        for line in reap_stale():
            print(f"[byzflower] {line}", file=sys.stderr)
        self.home.mkdir(parents=True, exist_ok=True)
        # if this process dies before stop() (SIGKILL, a crash), the watchdog stops what it recorded
        self.watchdog = Watchdog(self.home, remove=self._tmp is not None)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        flags, connection = self._security_args()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.name}"\n\n[superlink.{self.name}]\n'
            f'address = "127.0.0.1:{self.port}"\n{connection}\n'
        )
        log = open(self.home / "superlink.log", "ab")
        self.process = subprocess.Popen(
            [
                _bin("flower-superlink"),
                *flags,
                *(["--simulation"] if self.simulation else []),
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.home / "state.db"),
            ],
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._remember(self.process.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {self.process.returncode}; see {self.home}/superlink.log"
                )
            try:
                if self._healthy():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not become ready in {timeout:.0f} s")

    def _started(self) -> list[subprocess.Popen]:
        """The processes ``stop`` ends, together."""
        return [self.process] if self.process is not None else []

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the SuperLink and everything it started, a running ServerApp first (it records
        its run's end while the rest stands); SIGKILL what is left after ``grace``."""
        if started := self._started():
            self.pids.update(_terminate_tree(*started, grace=grace))
            self.process = None
        if self.watchdog is not None:
            if self._tmp is not None:
                self._tmp.cleanup()
            self.watchdog.release()
            self.watchdog = None

    def flwr(self, *args: str, timeout: float | None = None, stream_to=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args],
            env=self.env,
            capture_output=stream_to is None,
            text=True,
            timeout=timeout,
            stdout=stream_to,
            stderr=subprocess.STDOUT if stream_to is not None else None,
        )

    def run(
        self,
        app_dir: str | Path,
        run_config: dict[str, Any] | None = None,
        federation_config: dict[str, Any] | None = None,
        timeout: float | None = None,
        echo: bool = False,
    ) -> RunOutcome:
        """``flwr run APP --stream`` against this SuperLink; returns the run's real status.

        The CLI runs on a fresh copy of the app's files (``stage_app``), not on ``app_dir`` itself:
        the FAB is the same, and the CLI does not stat every file of the ignored folders."""
        self.current_run = None  # not the last run's id while this one is being staged
        staged = stage_app(app_dir, Path(tempfile.mkdtemp(prefix="app-", dir=self.home)))
        args = ["run", str(staged), self.name, "--stream"]
        if run_config:
            args += ["--run-config", toml_assignments(run_config)]
        if federation_config:
            args += ["--federation-config", toml_assignments(federation_config)]
        proc = subprocess.Popen(
            [_bin("flwr"), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        try:
            assert proc.stdout is not None
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                lines.append(line)
                if self.current_run is None and (started := re.search(r"started run\s+(\d+)", line, re.IGNORECASE)):
                    self.current_run = int(started.group(1))  # known while the run goes on (flwr stop)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    break
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(staged, ignore_errors=True)
        output = "".join(lines)
        match = re.search(r"run\s+(\d+)", output, re.IGNORECASE)
        run_id = int(match.group(1)) if match else None
        status = self.status(run_id) if run_id else None
        if status and status.startswith("finished") and not (status.endswith("completed") and ENDING in output):
            missed = self.missed_lines(run_id, output)  # the stream's end may have lost the run's last words
            if not status.endswith("completed"):  # a ServerApp killed outright left its summary 'running'
                missed += unended_lines(output + "".join(missed), status)
            if missed and echo:
                sys.stdout.write("".join(missed))
                sys.stdout.flush()
            output += "".join(missed)
        return RunOutcome(proc.returncode, run_id, status, output)

    def missed_lines(self, run_id: int, streamed: str, tries: int = 2) -> list[str]:
        """Lines of the finished run's stored log (``flwr log --show``) that ``streamed`` lacks.

        ``flwr run --stream`` ends when the SuperLink sees the run finished, and the SuperLink
        checks that after reading the log: lines stored between the two never reach the stream
        (flwr 1.42; seen under load, where a failed run's stream ended before its error). The
        stored log keeps them. Asked again once after a second when it shows nothing new."""
        for attempt in range(tries):
            if attempt:
                time.sleep(1.0)
            proc = self.flwr("log", str(run_id), self.name, "--show", timeout=60)
            if proc.returncode == 0 and (missed := missing_tail(streamed, proc.stdout or "")):
                return missed
        return []

    def status(self, run_id: int) -> str | None:
        proc = self.flwr("ls", self.name, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            data = json.loads(proc.stdout)
            runs = data.get("runs", [])
            return runs[0].get("status") if runs else None
        except (ValueError, AttributeError, IndexError):
            return None


class LocalDeployment(LocalSuperLink):
    """A deployment-mode SuperLink plus ``supernodes`` real SuperNode processes on this machine.

    Node ``i`` gets ``--node-config "partition-id=i num-partitions=K"`` and its own FLWR_HOME, as
    separate devices would. ``flwr run`` then goes through exactly the path of a real
    deployment: Fleet API, one ClientApp process per message, worker state on each node's disk.
    """

    simulation = False

    def __init__(
        self,
        supernodes: int = 2,
        home: str | Path | None = None,
        env: dict[str, str] | None = None,
        insecure: bool = False,
    ):
        if int(supernodes) < 1:
            raise ValueError(f"supernodes={supernodes} must be >= 1")
        super().__init__(home, env)
        self.supernodes = int(supernodes)
        self._insecure = bool(insecure)
        self.nodes: list[subprocess.Popen | None] = []

    def _security_args(self) -> tuple[list[str], str]:
        if self._insecure:
            return super()._security_args()
        self.credentials = make_credentials(self.home / "credentials", ["127.0.0.1", "localhost"], self.supernodes)
        c = self.credentials
        flags = [
            "--ssl-ca-certfile",
            str(c.ca_cert),
            "--ssl-certfile",
            str(c.server_cert),
            "--ssl-keyfile",
            str(c.server_key),
            "--enable-supernode-auth",
        ]
        return flags, f'root-certificates = "{c.ca_cert}"'

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        try:
            if self.credentials is not None:
                for i in range(self.supernodes):
                    self.register(self.credentials.node_public_key(i), f"supernode-{i}")
            for i in range(self.supernodes):
                self.start_node(i)
            time.sleep(1.0)
            dead = [i for i, n in enumerate(self.nodes) if n is not None and n.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"flower-supernode {dead[0]} exited with {self.nodes[dead[0]].returncode}; "
                    f"see {self.home}/supernode-{dead[0]}/supernode.log"
                )
        except BaseException:
            self.stop()
            raise

    def register(self, public_key: Path, name: str) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        out = self.flwr("supernode", "register", str(public_key), self.name, "--name", name, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed: {out.stdout}{out.stderr}")

    def node_command(self, i: int, *, key: Path | None = None, root_certificates: Path | None = None) -> list[str]:
        """The ``flower-supernode`` command of node ``i`` (its registered key and the CA by default)."""
        if self.credentials is None:
            security = ["--insecure"]
        else:
            security = [
                "--root-certificates",
                str(root_certificates or self.credentials.ca_cert),
                "--auth-supernode-private-key",
                str(key or self.credentials.node_keys[i]),
            ]
        return [
            _bin("flower-supernode"),
            *security,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={i} num-partitions={self.supernodes}",
        ]

    def start_node(self, i: int, command: list[str] | None = None) -> subprocess.Popen:
        """Start (or restart) SuperNode ``i``; it is stopped by PID with the others."""
        home = self.home / f"supernode-{i}"
        home.mkdir(parents=True, exist_ok=True)
        with open(home / "supernode.log", "ab") as log:
            node = subprocess.Popen(
                command or self.node_command(i),
                env={**self.env, "FLWR_HOME": str(home)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while len(self.nodes) <= i:
            self.nodes.append(None)
        self.nodes[i] = node
        self._remember(node.pid)
        return node

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its process tree (a device lost mid-run), by PID."""
        node = self.nodes[i]
        if node is None:
            return
        _signal(_tree(node.pid), signal.SIGKILL)
        node.wait(timeout=30)
        self.nodes[i] = None

    def _started(self) -> list[subprocess.Popen]:
        return [*super()._started(), *(node for node in self.nodes if node is not None)]

    def stop(self, grace: float = 15.0) -> None:
        super().stop(grace)  # the SuperNodes with the SuperLink, after the ServerApp
        self.nodes = []


def stage_app(app_dir: str | Path, into: Path) -> Path:
    """Copy the files of the Flower app in ``app_dir`` that its FAB can hold into ``into``; returns ``into``.

    ``flwr run DIR`` builds the FAB by statting every file under DIR and only then dropping what
    the app's ``.gitignore`` ignores: with a virtual environment inside the app (~45,000 files) that
    is 5-7 s of every run on these machines. Here the ignored folders (and ``.flwr``,
    ``__pycache__``) are pruned from the walk instead, so ``flwr run`` on the copy builds the same
    FAB (every pruned file was excluded there anyway) from a few hundred files. Symbolic links are
    skipped, as Flower skips them. A ``.gitignore`` with a negation (``!pattern``), which can take a
    file back from an ignored folder, prunes nothing.
    """
    import pathspec  # Flower's own gitignore matcher (a dependency of flwr)

    root = Path(app_dir).expanduser().resolve()
    if not (root / "pyproject.toml").is_file():  # else `flwr run` would name the empty copy, not app_dir
        raise FileNotFoundError(f"app_dir={str(app_dir)!r} holds no pyproject.toml: it is not a Flower app")
    into = into.resolve()
    ignore = root / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    prune = not any(line.strip().startswith("!") for line in lines)
    for folder, dirs, files in os.walk(root, followlinks=False):
        rel = Path(folder).relative_to(root)
        never = {"__pycache__", ".flwr"} if rel == Path(".") else {"__pycache__"}  # Flower's own excludes
        dirs[:] = [
            d
            for d in dirs
            if d not in never
            and not (Path(folder) / d).is_symlink()
            and Path(folder) / d != into
            and not (prune and spec.match_file(f"{(rel / d).as_posix()}/"))
        ]
        for name in files:
            source = Path(folder) / name
            if source.is_symlink() or spec.match_file((rel / name).as_posix()):
                continue
            target = into / rel / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return into


class LocalRayCluster:
    """A Ray head on this machine (``ray start --head --block``) on a free port, stopped by PID; a
    context manager whose ``address`` a ``LocalSuperLink(ray_address=...)`` hands to Flower's
    simulation, so that runs join it instead of starting and stopping Ray each (about 6 s a run on
    2 cores). Its session files live in a private home that goes with it; if this process dies hard,
    the next start of a SuperLink or cluster stops the cluster's processes (``reap_stale``)."""

    def __init__(self, num_cpus: int | None = None, timeout: float = 120.0, root: str | Path | None = None) -> None:
        self.num_cpus = num_cpus
        self.timeout = timeout
        self.root = root  # where its home goes (None: the system's temporary folder, where reap_stale looks)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.process: subprocess.Popen | None = None
        self.watchdog: Watchdog | None = None
        self.address = ""
        self.state_dir: Path | None = None  # where the ClientApps it runs keep their workers' state
        self.pids: set[int] = set()

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for line in reap_stale(self.root):
            print(f"[byzflower] {line}", file=sys.stderr)
        self._tmp = tempfile.TemporaryDirectory(prefix=HOME_PREFIX, dir=self.root)
        home = Path(self._tmp.name)
        self.watchdog = Watchdog(home)  # stops the cluster if this process dies before stop()
        port = _free_port()
        command = [_bin("ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1"]
        command += ["--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(home / "ray")]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(self.num_cpus)]
        log = open(home / "ray.log", "ab")
        # The ClientApps of the runs that join it run in its workers, which keep their worker state
        # in $BYZFLOWER_STATE_DIR: in this home, so it goes with the cluster (else <tmp>/byzflower-state-<user>).
        self.state_dir = Path(os.environ.get("BYZFLOWER_STATE_DIR") or home / "node-state")
        env = {**os.environ, "BYZFLOWER_STATE_DIR": str(self.state_dir)}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        write_owner(home, {"owner": os.getpid(), "pids": [self.process.pid]})
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                text = (home / "ray.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"ray start exited with {code}: {text}")
            if "Ray runtime started" in (home / "ray.log").read_text(errors="replace"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ray start did not report a running cluster in {self.timeout:.0f} s")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM ``ray start`` and every process of the cluster (its descendants); SIGKILL what is
        left after ``grace``; then delete the session files."""
        if self.process is not None:
            self.pids.update(_terminate_tree(self.process, grace=grace))
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None
