"""Run folders and the limits of the input, through the ``byzflower`` command (local engine).

Bad input is refused before any folder exists, one process owns a run folder at a time, a run
that fails or is interrupted after its folder exists says so in summary.json, and attackers at
the extremes of float32 never make the model non-finite."""

import ipaddress
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from byzflower.config import resolve
from byzflower.data import dataset_folder
from byzflower.engine import LocalRun, RunExists, open_run, run_local
from byzflower.flower.flower_runner import (
    _free_port,  # a port where nothing listens
    toml_assignments,
)
from byzflower.records.results import RunDirectory, RunFolderError

SMALL = {"num-honest": 8, "num-byzantine": 2, "seed": 3, "num-server-rounds": 6, "eval-every": 3}


def _config(**extra) -> str:
    values = {**SMALL, **{k.replace("_", "-"): v for k, v in extra.items()}}
    return toml_assignments(values)


@pytest.mark.parametrize(
    "config, message",
    [
        ("lr=nan", "lr=nan is outside the allowed range: a finite number >= 0"),
        ("attack-std=inf", "attack-std=inf is outside the allowed range"),
        ("run-name='../../escape'", "run-name='../../escape' must be one folder name inside results-dir"),
        ("device='cuda'", "device='cuda' but this machine shows no GPU"),
        ("num-honest=70000", "num-honest=70000 exceeds the 60000 training samples"),
        ("aggregator='multi-krum' krum-m=1000", "krum-m=1000 exceeds the run's 70 workers"),
    ],
)
def test_bad_input_is_refused_before_any_folder_exists(tmp_path, mnist, monkeypatch, capsys, config, message):
    if "cuda" in config and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device='cuda' is valid here")
    monkeypatch.setenv("BYZFLOWER_RESULTS_DIR", str(tmp_path / "results"))
    code = _main(["run", "--engine", "local", "--run-config", config])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert not (tmp_path / "escape").exists()


def _main(argv: list[str]) -> int:
    """``byzflower ARGV`` in this process (its signal handlers restored afterwards)."""
    from byzflower.cli import main

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return main(argv)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


SWEEP = ["sweep", "--optimizer", "sgd,batch-sgd", "--aggregator", "mean", "--attack", "none", "--jobs", "2"]


@pytest.mark.parametrize(
    "command, address, recorded, message",
    [
        (["run", "--engine", "local"], "auto", False, "--ray-address is for --engine flower"),
        (["run", "--engine", "deployment"], "auto", False, "not --engine deployment"),
        (["run"], "head-node", False, "ray address 'head-node' is not 'auto' or HOST:PORT"),
        (["run"], "127.0.0.1:0", False, "ray address '127.0.0.1:0' is not 'auto' or HOST:PORT with a port 1-65535"),
        (["run"], "127.0.0.1:99999", False, "'127.0.0.1:99999' is not 'auto' or HOST:PORT with a port 1-65535"),
        (["run"], f"127.0.0.1:{10**38}", False, f"'127.0.0.1:{10**38}' is not 'auto' or HOST:PORT"),
        (["run"], "127.0.0.1:{port}", False, "ray address '127.0.0.1:{port}': nothing answers there"),
        (["run"], "auto", False, "ray address 'auto': no cluster is recorded on this machine"),
        (["run"], "auto", True, "(the cluster recorded in {record}, 127.0.0.1:{port}): nothing answers there"),
        (SWEEP, "127.0.0.1:{port}", False, "ray address '127.0.0.1:{port}': nothing answers there"),
        (SWEEP, "auto", True, "(the cluster recorded in {record}, 127.0.0.1:{port}): nothing answers there"),
    ],
)
def test_a_ray_address_is_checked_before_any_process_starts(
    tmp_path, mnist, monkeypatch, capsys, command, address, recorded, message
):
    """``--ray-address`` (``run``: Flower's simulation on a running Ray cluster; ``sweep``: runs spread
    over it): a wrong engine, a malformed address, one where nothing answers, or 'auto' with no
    cluster recorded by ``ray start`` (or a dead one) is one line, before a SuperLink or Ray starts
    (Ray itself waited minutes on a dead address)."""
    port = _free_port()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    record = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    if recorded:
        record.parent.mkdir(parents=True)
        record.write_text(f"127.0.0.1:{port}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a SuperLink's home would appear
    where = ["--out", f"{tmp_path}/r"] if command[0] == "sweep" else ["--run-config", f"results-dir='{tmp_path}/r'"]
    code = _main([*command, "--ray-address", address.format(port=port), *where])
    err = capsys.readouterr().err
    assert code == 2 and message.format(port=port, record=record) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["raytmp"] if recorded else [])  # nothing started


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--supernodes", str(10**23)], f"--supernodes={10**23} exceeds the run's 70 workers"),
        (["run", "--supernodes", "71"], "--supernodes=71 exceeds the run's 70 workers: a SuperNode beyond them"),
        (["run", "--gpus-per-client", "-1"], "--gpus-per-client=-1.0 must be a finite share >= 0"),
        (["run", "--gpus-per-client", "nan"], "--gpus-per-client=nan must be a finite share >= 0"),
        (["run", "--gpus-per-client", "inf"], "--gpus-per-client=inf must be a finite share >= 0"),
        (["run", "--gpus-per-client", "64"], "--gpus-per-client=64.0 but torch sees"),
        (["run", "--cpus-per-client", "100000"], "--cpus-per-client=100000 exceeds this machine's"),
        (["run", "--cpus-per-client", "-1"], "--cpus-per-client=-1 must be >= 1"),
        (["run", "--run-config", f"num-byzantine={2**63 - 1}"], "is outside the allowed range: an integer >= 0"),
        (["sweep", "--jobs", "0"], "--jobs=0 must be >= 1"),
        (["sweep", "--jobs", "-3"], "--jobs=-3 must be >= 1"),
        (["credentials", "creds", "--host", "x", "--supernodes", str(10**9)], "--supernodes=1000000000 must be 1.."),
        (["credentials", "creds", "--host", "", "--supernodes", "1"], "--host: host '' is not an IP address or a"),
        (["credentials", "creds", "--host", "a b", "--supernodes", "1"], "host 'a b' is not an IP address or a DNS"),
        (["credentials", "creds", "--host", "a" * 300, "--supernodes", "1"], "is not an IP address or a DNS name"),
    ],
)
def test_command_line_values_out_of_range_are_refused_before_anything_starts(
    tmp_path, mnist, monkeypatch, capsys, argv, message
):
    """Flower's simulation asked for more CPUs or GPUs per ClientApp than the machine has crashed with
    'ActorPool is empty' after its start-up (a traceback, a run folder); a 23-digit --supernodes ended in
    Flower's own error box; a 19-digit num-byzantine raised TypeError from a torch allocation; --jobs 0
    or -3 ran one at a time without a word; an empty or 300-character --host raised ValueError from the
    certificate library, and 'a b' made a certificate no device could match."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a SuperLink's home would appear
    where = ["--out", f"{tmp_path}/r"] if argv[0] == "sweep" else []
    where += ["--run-config", f"results-dir='{tmp_path}/r'"] if argv[0] == "run" and "--run-config" not in argv else []
    if "--run-config" in argv:
        argv = [*argv[:-1], argv[-1] + f" results-dir='{tmp_path}/r'"]
    code = _main([*argv, *where])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no run folder, no SuperLink home, no credentials


def test_an_ipv6_ray_address_is_taken_as_ray_writes_it():
    from byzflower.ray_address import check_ray_address

    with socket.socket(socket.AF_INET6) as head:
        head.bind(("::1", 0))
        head.listen()
        port = head.getsockname()[1]
        check_ray_address(f"[::1]:{port}")  # answers: no error
        with pytest.raises(ValueError, match=f"'::1:{port}' is not 'auto' or HOST:PORT"):
            check_ray_address(f"::1:{port}")  # unbracketed: the port cannot be told from the address
    with pytest.raises(ValueError, match=f"ray address '\\[::1\\]:{port}': nothing answers there"):
        check_ray_address(f"[::1]:{port}")
    with pytest.raises(ValueError, match="is not 'auto' or HOST:PORT"):
        check_ray_address("[]:6379")


def test_flowers_simulation_starts_its_own_ray_unless_given_a_cluster(monkeypatch):
    """The SuperLink's environment says which Ray Flower's simulation uses: --ray-address, else Ray's own
    $RAY_ADDRESS, else 'local' (a new Ray, never the cluster a `ray start` left recorded)."""
    from byzflower.flower.flower_runner import LocalSuperLink

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert LocalSuperLink().env["RAY_ADDRESS"] == "local"
    with socket.socket() as head:  # something answering, as a cluster's GCS port would
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        assert LocalSuperLink(ray_address=address).env["RAY_ADDRESS"] == address
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert LocalSuperLink().env["RAY_ADDRESS"] == address


def test_the_ray_a_run_starts_keeps_its_session_files_in_the_runs_home(monkeypatch):
    """Where Flower's simulation starts its own Ray, RAY_TMPDIR is the SuperLink's home (deleted with it;
    the whole run is checked in test_flower_app); a cluster joined, the user's own RAY_TMPDIR, or a home
    too deep for Ray's socket paths keep Ray's own place."""
    from byzflower.flower.flower_runner import LocalSuperLink
    from byzflower.ray_address import private_ray_tmpdir

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    link = LocalSuperLink()
    assert link.env["RAY_TMPDIR"] == str(link.home)
    with socket.socket() as head:  # something answering, as a cluster's GCS port would
        head.bind(("127.0.0.1", 0))
        head.listen()
        assert "RAY_TMPDIR" not in LocalSuperLink(ray_address=f"127.0.0.1:{head.getsockname()[1]}").env
    monkeypatch.setenv("RAY_TMPDIR", "/mine")
    assert LocalSuperLink().env["RAY_TMPDIR"] == "/mine"
    assert private_ray_tmpdir("/tmp/short", {}) == "/tmp/short"
    assert private_ray_tmpdir("/tmp/short", {"RAY_TMPDIR": "/mine"}) is None
    longest = 35 if sys.platform == "darwin" else 39  # Ray's plasma socket below it: 103 / 107 bytes at most
    assert private_ray_tmpdir("/" + "d" * (longest - 1), {}) == "/" + "d" * (longest - 1)
    assert private_ray_tmpdir("/" + "d" * longest, {}) is None


def test_a_dead_ray_address_in_the_environment_is_refused_like_the_option(tmp_path, mnist, monkeypatch, capsys):
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = _main(["run", "--run-config", f"results-dir='{tmp_path}/r'"])
    out, err = capsys.readouterr()
    assert f"joining the Ray cluster at $RAY_ADDRESS='127.0.0.1:{port}'" in out
    assert code == 2 and f"'127.0.0.1:{port}': nothing answers there" in err and list(tmp_path.iterdir()) == []


def test_an_unwritable_results_dir_is_refused_up_front(tmp_path, mnist, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = _main(["run", "--engine", "local", "--run-config", f"results-dir='{blocker}/runs'"])
    assert code == 2 and f"results-dir='{blocker}/runs' cannot be written" in capsys.readouterr().err


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past ``limit`` bytes fail (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_run_whose_files_cannot_grow_ends_failed_in_one_line_and_says_so_in_its_summary(tmp_path, mnist):
    """The disk fills mid-run (here: the process may write no file past 16 KB, so metrics.jsonl stops
    growing after ~20 evaluations and the figures cannot be saved): the run ends 'failed' with the OS's
    error in summary.json, the log says which record could not be written, the command prints one error
    line (it printed two chained tracebacks before) and no temporary file is left. The split's cache
    (480 kB) cannot be written either: a cache, so the run goes on without it, says so, and leaves no
    temporary file in the cache folder (it failed the run when no earlier test had cached that split)."""
    config = _config(
        num_server_rounds=200, eval_every=1, eval_train_samples=200, results_dir=str(tmp_path), run_name="r", seed=9173
    )
    # a seed of this test's own: its split is never cached (here its cache cannot be written)
    partitions = dataset_folder("mnist", os.environ.get("BYZFLOWER_DATA_DIR", "")) / "partitions"
    before = sorted(p.name for p in partitions.iterdir())
    command = [sys.executable, "-m", "byzflower.cli", "run", "--engine", "local", "--run-config", config]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(16384))
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert "could not be written (File too large); it is computed again next time" in done.stderr
    assert sorted(p.name for p in partitions.iterdir()) == before  # no cache, no temporary file
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: [Errno 27] File too large"
    ]
    assert "but the figures could not be written in" in done.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "OSError: [Errno 27] File too large"
    records = RunDirectory(tmp_path / "r").records()
    assert 5 < len(records) < 200 and records == sorted(records, key=lambda r: r["iteration"])
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        ".lock",
        "config.json",
        "metrics.jsonl",
        "summary.json",
    ]


def test_a_summary_that_cannot_be_written_is_said_and_the_folder_is_released(tmp_path, mnist):
    """summary.json cannot be written at all (its temporary file's name is taken by a folder): the run's
    own error comes out, the log names what could not be recorded, and the run folder is unlocked."""
    cfg = resolve({**SMALL, "results-dir": str(tmp_path), "run-name": "r", "eval-train-samples": 200})
    lines: list[str] = []
    run = LocalRun(cfg, log=lines.append)
    (run.run_dir.path / ".summary.json.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        run.run()
    assert any(f"but summary.json could not be written in {run.run_dir.path}" in line for line in lines), lines
    assert lines[-1].startswith("failed: IsADirectoryError") and run.recorder.finished
    assert RunDirectory(run.run_dir.path).holder() is None  # released: another process may take it


def test_a_second_process_on_a_run_folder_is_refused_with_the_holders_pid(tmp_path):
    first = RunDirectory.create(tmp_path, "shared", {"k": 1})
    code = (
        "import sys\n"
        "from byzflower.records.results import RunDirectory, RunFolderError\n"
        f"try:\n    RunDirectory({str(first.path)!r}).lock()\n"
        "except RunFolderError as exc:\n    print(exc); sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode == 3 and f"in use by another run (process {os.getpid()})" in other.stdout
    first.unlock()  # released: the folder can be taken again
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_the_holders_pid_is_read_only_while_held_and_even_just_after_the_lock_is_taken(tmp_path):
    """``holder()`` (what a stopped sweep signals) names the process holding the lock: also in the
    instant between the holder's flock and its writing its PID, and never a previous holder's PID
    (a released lock's file is emptied)."""
    import fcntl
    import threading

    folder = RunDirectory.create(tmp_path, "busy", {"k": 1})
    assert folder.holder() == os.getpid()
    folder.unlock()
    assert folder.holder() is None and (folder.path / RunDirectory.LOCK).read_text() == ""
    fd = os.open(folder.path / RunDirectory.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, its PID not written yet
        threading.Timer(0.3, lambda: os.pwrite(fd, b"4242", 0)).start()
        assert folder.holder() == 4242
        for damaged in (b"0", b"1", b"9" * 40, b"-5", b"nan"):  # 0 would signal our own process group
            os.ftruncate(fd, 0)
            os.pwrite(fd, damaged, 0)
            assert folder.holder() is None, damaged
    finally:
        os.close(fd)
    assert folder.holder() is None


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_ends_interrupted(tmp_path, mnist):
    """Two runs with one run-name at once never share a folder: the second is refused with the
    first's PID. SIGTERM then stops the first, whose summary says it was interrupted."""
    env = {**os.environ, "BYZFLOWER_RESULTS_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "byzflower.cli", "run", "--engine", "local", "--run-config"]
    config = _config(run_name="twin", num_server_rounds=100000)
    first = subprocess.Popen([*command, config], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "twin" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while (not metrics.exists() or metrics.read_text().count("\n") < 2) and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run([*command, config], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1 and f"in use by another run (process {first.pid})" in second.stderr
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    summary = json.loads((tmp_path / "twin" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert "interrupted" in out + err
    iterations = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines()]
    assert iterations == sorted(set(iterations)) and iterations[:2] == [0, 3]  # one writer, in order


def test_a_changed_config_for_a_named_run_is_one_line_naming_the_keys(tmp_path, mnist, capsys):
    base = {**SMALL, "results-dir": str(tmp_path), "run-name": "named"}
    run_local(resolve(base), log=lambda _: None)
    with pytest.raises(RunExists, match=r"differing in lr \(0.1 there, 0.05 now\), seed \(3 there, 4 now\)"):
        open_run(resolve({**base, "lr": 0.05, "seed": 4}))
    config = toml_assignments(base)
    code = _main(["run", "--engine", "local", "--run-config", config + " lr=0.05"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "differing in lr" in err
    assert isinstance(RunExists("x"), RunFolderError)


@pytest.mark.parametrize(
    "attack, aggregator",
    [
        ("attack='sign-flip' attack-scale=-1e20", "gm"),
        ("attack='sign-flip' attack-scale=-1e20", "centered-clipping"),
        ("attack='noise' attack-std=1e18", "gm"),
        ("attack='sign-flip' attack-scale=3e38", "median"),
    ],
)
def test_attackers_at_float32_extremes_leave_a_finite_model(tmp_path, mnist, attack, aggregator):
    from byzflower.cli import parse_run_config

    text = f"{attack} aggregator='{aggregator}' results-dir='{tmp_path}' num-server-rounds=40 eval-every=20"
    summary = run_local(resolve({**SMALL, **parse_run_config(text)}), log=lambda _: None)
    assert summary["status"] == "finished" and summary["totals"].get("failed", 0) == 0
    final = summary["final"]
    start = json.loads((next(tmp_path.iterdir()) / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(final["test_loss"]) and final["test_accuracy"] > start["test_accuracy"]
    model = torch.load(next(tmp_path.iterdir()) / "model.pt")
    assert all(bool(torch.isfinite(v).all()) for v in model.values())


def test_a_damaged_checkpoint_is_one_line_and_the_summary_says_why(tmp_path, mnist, capsys):
    """A named run resumed from a checkpoint that torch cannot read (a copy cut short): one error line
    naming the file (a RuntimeError traceback from torch's zip reader before), exit 1, summary 'failed'."""
    config = _config(checkpoint_every=2, results_dir=str(tmp_path), run_name="r")
    cfg = resolve({**SMALL, "checkpoint-every": 2, "results-dir": str(tmp_path), "run-name": "r"})
    run = LocalRun(cfg, log=lambda _: None)
    for t in (1, 2):
        run.step(t)
    run._checkpoint(2)  # as a run stopped after iteration 2 leaves it
    run.run_dir.unlock()
    checkpoint = tmp_path / "r" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert _main(["run", "--engine", "local", "--run-config", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint} is damaged: torch cannot read it back (") and "Traceback" not in err
    assert err.rstrip().endswith("move the run folder away (the run then starts over)") and err.count("\n") == 1
    summary = RunDirectory(tmp_path / "r").summary()
    assert summary["status"] == "failed" and "checkpoint.pt is damaged" in summary["error"]


def test_damaged_run_folders_are_named_left_out_of_reports_and_stop_a_sweep_before_it_starts(tmp_path, mnist, capsys):
    """A run folder's file that is not what byzflower wrote (a copy cut short, a disk fault): `report`
    leaves the run out and names the file, `sweep` stops before any work with one line naming it
    (both printed a JSONDecodeError traceback before)."""
    sweep = ["sweep", "--optimizer", "sgd", "--aggregator", "mean,gm,median", "--attack", "none"]
    sweep += ["--run-config", "num-honest=4 num-byzantine=2 num-server-rounds=2 eval-every=1 eval-train-samples=200"]
    sweep += ["--out", str(tmp_path)]
    assert _main(sweep) == 0
    (tmp_path / "sgd-gm-none" / "summary.json").write_text('{"status": "fini')  # cut short
    with open(tmp_path / "sgd-mean-none" / "metrics.jsonl", "a") as f:
        f.write('garbage\n{"iteration": 3}\n')  # a bad line that is not the last
    with open(tmp_path / "sgd-median-none" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "test_acc')  # a last line cut short, as a killed run leaves it: fine
    capsys.readouterr()
    assert _main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"left out of the report: {tmp_path}/sgd-gm-none/summary.json is damaged: not JSON" in out
    assert f"left out of the report: {tmp_path}/sgd-mean-none/metrics.jsonl is damaged: line 4 is not JSON" in out
    table = (tmp_path / "table.md").read_text()
    assert "median" in table and "| gm" not in table.lower() and "Traceback" not in out + err
    started = sorted(p.name for p in tmp_path.iterdir())
    assert _main(sweep) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: {tmp_path}/sgd-gm-none/summary.json is damaged: not JSON (Unterminated string starting at: "
        "line 1 column 12 (char 11)); move the run folder away (a sweep then runs it again)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == started  # nothing ran
    (tmp_path / "sgd-median-none" / "config.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match=r"config\.json is damaged: a JSON list, not an object"):
        RunDirectory(tmp_path / "sgd-median-none").config()


def test_a_sweep_run_that_fails_beside_a_damaged_summary_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    """run_cell never raises: a failing run whose folder holds a damaged summary.json is returned as
    failed, and the log says the failure could not be recorded there (was: the JSONDecodeError escaped)."""
    from byzflower.experiments.sweep import run_cell

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "summary.json").write_text('{"status": "runn')
    outcome = run_cell({"run-name": "bad", "results-dir": str(tmp_path), "lr": -1.0})
    assert outcome["status"] == "failed" and "lr=-1.0 is outside the allowed range" in outcome["error"]
    out = capsys.readouterr().out
    assert f"could not record the failure in {folder / 'summary.json'}: Unterminated string" in out


def test_certificate_hosts_are_ip_addresses_or_dns_names():
    from cryptography import x509

    from byzflower.flower.credentials import parse_host

    assert parse_host("[::1]") == parse_host("::1") == x509.IPAddress(ipaddress.ip_address("::1"))
    long_name = ".".join(["a" * 63] * 3) + ".org"  # 195 characters: more than a CN's 64, a valid DNS name
    assert parse_host(long_name) == x509.DNSName(long_name) and parse_host("host.example.") == x509.DNSName(
        "host.example"
    )
    for bad in ("", "a b", "-x.org", "x-.org", "a..b", "a" * 64 + ".org", ".".join(["a" * 63] * 4) + ".org", "é.org"):
        with pytest.raises(ValueError, match="is not an IP address or a DNS name"):
            parse_host(bad)


@pytest.mark.parametrize("engine", ["local", "flower"])
def test_a_named_run_with_a_damaged_summary_is_one_line_and_its_folder_is_left_unlocked(tmp_path, engine):
    """Started again, a named run whose summary.json is not JSON is refused naming the file, before anything
    is built, and the folder is released (the local engine read it after building; the ServerApp outside
    its error handling, a traceback)."""
    from byzflower.flower.server_app import _finished
    from byzflower.records.results import DamagedRunFolder

    cfg = resolve({**SMALL, "num-server-rounds": 2, "eval-every": 2, "results-dir": str(tmp_path), "run-name": "cut"})
    run_local(cfg, log=lambda _: None)
    (tmp_path / "cut" / "summary.json").write_text('{"status": "fini')
    records = (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    with pytest.raises(DamagedRunFolder, match=r"summary\.json is damaged"):
        if engine == "local":
            LocalRun(cfg, log=lambda _: None)
        else:
            run, resume = open_run(cfg)
            assert resume
            _finished(run)
    held = RunDirectory(tmp_path / "cut")
    held.lock()  # free again
    held.unlock()
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == records


def test_credentials_already_in_a_folder_are_replaced_only_when_asked(tmp_path, capsys):
    """Run again into the same folder, ``byzflower credentials`` wrote a new CA and new keys over the old ones
    without a word, locking out every device set up with them; now it refuses, naming the files, and leaves
    them as they were; ``--replace`` replaces them all."""
    creds = tmp_path / "creds"
    argv = ["credentials", str(creds), "--host", "192.0.2.10", "--supernodes", "2"]
    assert _main(argv) == 0
    before = {p.name: p.read_bytes() for p in creds.iterdir()}
    assert set(before) == {"ca.crt", "ca.key", "server.pem", "server.key"} | {
        f"supernode-{i}{s}" for i in (0, 1) for s in ("", ".pub")
    }
    capsys.readouterr()
    assert _main([*argv[:-1], "3"]) == 2  # one more device: still the same CA, refused
    err = capsys.readouterr().err
    assert "already holds credentials (ca.crt, ca.key, server.pem, server.key, supernode-0, supernode-0.pub and" in err
    assert "--replace" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in creds.iterdir()} == before
    assert _main([*argv, "--replace"]) == 0
    after = {p.name: p.read_bytes() for p in creds.iterdir()}
    assert set(after) == set(before) and all(after[n] != before[n] for n in before)


def test_a_folder_from_an_older_version_without_a_newer_key_is_the_same_run():
    """A key added to byzflower after a run was made is absent from its config.json: it counts as its
    default (what the older version did), so such a folder still resumes, or is skipped by a sweep, instead
    of being refused as another run's; a real difference, or a non-default value now, is still named."""
    from byzflower.records.results import config_difference

    cfg = resolve({**SMALL}).resolved()
    older = json.loads(json.dumps(cfg))
    del older["gm-tol"]
    assert config_difference(older, cfg) == ""
    assert config_difference(older, resolve({**SMALL, "gm-tol": 1e-3}).resolved()) == "gm-tol (1e-05 there, 0.001 now)"
    older["num-server-rounds"] = 7
    assert config_difference(older, cfg) == "num-server-rounds (7 there, 6 now)"
    moved = {**json.loads(json.dumps(cfg)), "results-dir": "/elsewhere", "checkpoint-every": 5}
    assert config_difference(moved, cfg) == ""  # where it lies, and what may change on resumption


@pytest.mark.parametrize("engine", ["local", "flower"])
def test_a_checkpoint_this_code_cannot_put_back_is_one_line_and_the_records_stay(tmp_path, engine):
    """A checkpoint written by another version (here: SAGA's state without its table average, a rule's
    state with an entry this rule does not keep) ended a resume in a KeyError traceback from inside the
    estimator; now one line names the file and the two ways on, and the records up to it are kept."""
    from byzflower.config import rule_of
    from byzflower.factory import dataset_of, gradients_of, recorder_of
    from byzflower.flower.server_app import _resume
    from strategies.strategy import RobustSGD
    from tests.test_local_engine import interrupted_after

    config = {
        **SMALL,
        "optimizer": "saga",
        "aggregator": "centered-clipping",  # a rule with a state of its own
        "checkpoint-every": 2,
        "results-dir": str(tmp_path),
        "run-name": "older",
    }
    cfg = resolve(config)
    interrupted_after(LocalRun(cfg, log=lambda _: None), 4)
    folder = tmp_path / "older"
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    del state["workers"]["honest"]["gbar"]
    state["rule"] = {"momentum": torch.zeros(3)}  # another version's rule state
    torch.save(state, folder / "checkpoint.pt")
    records = (folder / "metrics.jsonl").read_bytes()
    message = r"checkpoint\.pt holds a state this byzflower cannot put back \(KeyError: .*\); written by another"
    if engine == "local":
        with pytest.raises(RunFolderError, match=message):
            LocalRun(cfg, log=lambda _: None)
        assert json.loads((folder / "summary.json").read_text())["status"] == "failed"
    else:  # the ServerApp's resume of the same state: the rule's is what it cannot take
        (folder / "server-checkpoint.pt").write_bytes((folder / "checkpoint.pt").read_bytes())
        run, _ = open_run(cfg)
        data = dataset_of(cfg)
        grads = gradients_of(cfg, data, torch.device("cpu"))
        recorder = recorder_of(cfg, data, grads, torch.device("cpu"), lambda _: None, run)
        with pytest.raises(RunFolderError, match=message):
            _resume(recorder, RobustSGD(rule_of(cfg), lr=cfg.lr))
        run.unlock()
    assert (folder / "metrics.jsonl").read_bytes() == records


def test_a_sweep_runs_replicate_seeds_and_adds_seeds_later(tmp_path, mnist, capsys):
    """`--seed 1,2` runs every cell once per seed, in folders named by it, which the report shows as mean ±
    std; a later `--seed 1,2,3` into the same folder runs only the new seed. (Without it a second seed
    was refused as another config in the cell's folder.) Also: a sweep whose --run-config alone is no
    valid run (num-byzantine=0 with the default attack) was refused though every cell set attack='none'."""
    out = tmp_path / "sw"
    config = "num-honest=4 num-byzantine=0 num-server-rounds=2 eval-every=2 checkpoint-every=0"
    argv = ["sweep", "--optimizer", "sgd", "--aggregator", "mean", "--attack", "none", "--run-config", config]
    assert _main([*argv, "--seed", "1,2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["sgd-mean-none-s1", "sgd-mean-none-s2"]
    assert [json.loads((out / n / "config.json").read_text())["seed"] for n in names] == [1, 2]
    finals = [json.loads((out / n / "summary.json").read_text())["final"]["test_accuracy"] for n in names]
    assert finals[0] != finals[1]  # two draws, not one run twice
    assert "(n=2)" in (out / "table.md").read_text()
    first = (out / "sgd-mean-none-s1" / "metrics.jsonl").read_bytes()
    assert _main([*argv, "--seed", "1,2,3", "--out", str(out), "--no-report"]) == 0
    assert (out / "sgd-mean-none-s1" / "metrics.jsonl").read_bytes() == first  # finished: skipped
    assert json.loads((out / "sgd-mean-none-s3" / "summary.json").read_text())["status"] == "finished"
    assert _main([*argv[:-1], config + " seed=4", "--seed", "1", "--out", str(out)]) == 2
    assert "may not set 'seed' in a sweep (--seed sets it" in capsys.readouterr().err
    refused = [("1,x", "'x' not a seed"), ("2,2", "--seed repeats 2"), ("", "--seed is empty")]
    refused += [("-1", "'-1' not a seed"), ("1,99999999999999999999", "seed=99999999999999999999 is outside")]
    for bad, said in refused:
        assert _main([*argv, "--seed", bad, "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.is_dir())[-1] == "sgd-mean-none-s3"  # nothing more made
    assert _main([*argv, "--out", str(tmp_path / "one"), "--no-report"]) == 0  # no --seed: the config's, no suffix
    assert [p.name for p in (tmp_path / "one").iterdir() if p.is_dir()] == ["sgd-mean-none"]


def _killed_run(root) -> RunDirectory:
    """A run folder as a ServerApp killed outright after iteration 10 leaves it: the summary of its
    start ('running'), two evaluation records, no process holding it."""
    run = RunDirectory.create(root, "killed", {"optimizer": "sgd"})
    run.begin({"iterations": 0, "starts_at": 1, "config": {"optimizer": "sgd"}})
    for t in (0, 10):
        run.append({"iteration": t, "test_accuracy": 0.5})
    run.unlock()
    return run


def test_a_flower_run_whose_serverapp_was_killed_is_recorded_failed_when_flower_says_it_ended(tmp_path):
    """Flower says the run ended (``finished:failed``, 30-60 s after its ServerApp's process died:
    its heartbeat) but the folder still says 'running' and no process holds it: ``LocalSuperLink.run``
    records it as failed after its last evaluated iteration, and says so in the log. (Measured:
    ``kill -9`` of ``flwr-simulation`` at iteration 50; ``byzflower run`` ended 56 s later printing
    'finished:failed', and summary.json said 'running' at iteration 0.)"""
    from byzflower.flower.flower_runner import unended_lines

    run = _killed_run(tmp_path)
    output = f"\x1b[92mINFO \x1b[0m:      [byzflower] results: {run.path}\nmore lines\n"
    lines = unended_lines(output, "finished:failed")
    summary = run.summary()
    assert summary["status"] == "failed" and summary["iterations"] == 10
    assert summary["error"].startswith("the ServerApp's process ended without recording how the run ended")
    assert "(Flower: finished:failed)" in summary["error"]
    assert summary["config"] == {"optimizer": "sgd"} and summary["starts_at"] == 1  # the rest kept
    assert len(run.records()) == 2  # the records stay (a named run resumes from its checkpoint)
    assert len(lines) == 1 and "Recorded as failed after iteration 10" in lines[0] and str(run.path) in lines[0]
    assert unended_lines(output, "finished:failed") == []  # recorded: nothing more to say


def test_a_run_that_recorded_its_end_or_is_held_is_left_as_it_is(tmp_path):
    from byzflower.flower.flower_runner import unended_lines

    run = _killed_run(tmp_path)
    output = f"[byzflower] results: {run.path}\n"
    before = (run.path / "summary.json").read_text()
    holder = RunDirectory(run.path)
    holder.lock()  # its ServerApp still writing its end
    try:
        assert unended_lines(output, "finished:failed") == []
    finally:
        holder.unlock()
    run.write_json("summary.json", {**run.summary(), "status": "interrupted", "error": "stopped by SIGTERM"})
    recorded = (run.path / "summary.json").read_text()
    assert unended_lines(output, "finished:stopped") == []
    assert (run.path / "summary.json").read_text() == recorded != before
    assert unended_lines("no results line: the run never reached its folder\n", "finished:failed") == []


def test_a_results_line_naming_no_readable_run_changes_nothing_and_raises_nothing(tmp_path):
    """The folder named in the log is not trusted to be a run: missing, a file, without a summary or
    with a damaged one, it is left as it is (no traceback from the run's end)."""
    from byzflower.flower.flower_runner import unended_lines

    damaged = _killed_run(tmp_path)
    (damaged.path / "summary.json").write_text('{"status": "running", "iterat')
    bare = tmp_path / "bare"
    bare.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for path in (tmp_path / "missing", a_file, bare, damaged.path):
        assert unended_lines(f"[byzflower] results: {path}\n", "finished:failed") == []
    assert (damaged.path / "summary.json").read_text() == '{"status": "running", "iterat'
    assert sorted(p.name for p in bare.iterdir()) == []
