"""Through real Flower: a local SuperLink process, simulated SuperNodes, the app's ServerApp and ClientApp."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from byzflower.flower.flower_runner import (
    ENDING,
    LocalRayCluster,
    LocalSuperLink,
    RunOutcome,
    _alive,
    descendants,
    missing_tail,
    toml_assignments,
)
from byzflower.flower.node_state import run_state_dir, state_key
from byzflower.records.experiment import ending_line

pytestmark = pytest.mark.flower
APP = os.path.join(os.path.dirname(__file__), "..")
TIMING = {"elapsed_s", "iters_per_s"}
BASE = {"num-server-rounds": 20, "eval-every": 10, "num-honest": 20, "attack": "none", "aggregator": "mean", "seed": 7}


# A user's own model, importable by every process of the run (here through PYTHONPATH)
USER_MODELS = """
from torch import nn


def conv_groupnorm(input_shape, num_classes):
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 4, 5, stride=2), nn.GroupNorm(2, 4), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 12 * 12, num_classes),
    )
"""


@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray cluster for the module's runs (``--ray-address``): each run joins it instead of
    starting Ray (~6 s a run here). The first run goes through ``byzflower run`` without it, so
    Flower's own Ray start is tested too, and gives the same numbers."""
    with LocalRayCluster(num_cpus=2) as cluster:
        yield cluster
        # every run that ended asked its nodes to delete their workers' state (the one interrupted
        # named run's test deletes what it keeps)
        assert sorted(p.name for p in cluster.state_dir.glob("*")) == []
    assert cluster.pids and not any(_alive(p) for p in cluster.pids)  # stopped by PID, all of it


@pytest.fixture(scope="module")
def superlink(tmp_path_factory, ray_cluster):
    folder = tmp_path_factory.mktemp("user-models")
    (folder / "byzflower_user_models.py").write_text(USER_MODELS)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(folder))  # the local engine's runs, in this process
    try:
        # apps that write to their working directory (Flower's template: final_model.npz) write here
        with LocalSuperLink(env={"PYTHONPATH": path}, cwd=folder, ray_address=ray_cluster.address) as link:
            yield link
    finally:
        sys.path.remove(str(folder))


def _run(superlink, tmp_path, name, supernodes, **overrides):
    config = {**BASE, "results-dir": str(tmp_path), "run-name": name, **overrides}
    outcome = superlink.run(APP, config, {"num-supernodes": supernodes}, timeout=400)
    return outcome, tmp_path / name


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The README's command: ``byzflower run`` (Flower's simulation, its own SuperLink and Ray), as a
    user runs it: no RAY_TMPDIR, and a temporary folder of its own (short: Ray's sockets go below it),
    whose contents after the run are returned too."""
    tmp = tmp_path_factory.mktemp("runs")
    config = toml_assignments({**BASE, "results-dir": str(tmp), "run-name": "k3-a"})
    command = [sys.executable, "-m", "byzflower.cli", "run", "--supernodes", "3", "--run-config", config]
    scratch = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"} | {"TMPDIR": str(scratch)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp, env=env)
        left = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    output = done.stdout + done.stderr
    found = re.search(r"^run (\d+): (\S+)$", done.stdout, re.MULTILINE)
    outcome = RunOutcome(done.returncode, *((int(found[1]), found[2]) if found else (None, None)), output)
    return tmp, outcome, tmp / "k3-a", left


def test_byzflower_run_leaves_nothing_in_the_temporary_folder(first_run):
    """Its SuperLink's home, the worker state and the session files of the Ray it started (which Ray
    would leave in $TMPDIR/ray) are all deleted when it stops."""
    _, outcome, _, left = first_run
    assert outcome.ok, outcome.output[-3000:]
    assert left == []


def test_run_finishes_learns_and_writes_its_results(first_run):
    _, outcome, run_dir, _ = first_run
    assert outcome.ok, outcome.output[-3000:]
    assert outcome.status == "finished:completed"
    for f in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "variance.png"):
        assert (run_dir / f).is_file(), f
    records = _metrics(run_dir)
    assert [r["iteration"] for r in records] == [0, 10, 20]
    assert records[0]["test_accuracy"] < 0.2  # the initial model guesses
    assert records[-1]["test_accuracy"] > 0.5  # well above chance after 20 iterations
    assert records[-1]["honest_variance"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 20
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 0.1 and config["batch-size"] == 5 and config["num-honest"] == 20


def test_same_seed_gives_identical_metrics_with_one_worker_per_supernode(superlink, first_run):
    """A second run with the same seed, and 20 SuperNodes (one worker each) instead of 3, on a Ray
    cluster it joins instead of the Ray that Flower started for the first, gives the first run's
    metrics exactly: numbers depend on the seed alone, not on the run, the grouping or the cluster."""
    tmp, _, run_dir, _ = first_run
    outcome, per_worker = _run(superlink, tmp, "k20", 20)
    assert outcome.ok, outcome.output[-3000:]
    assert _metrics(per_worker) == _metrics(run_dir)


def test_bad_config_fails_the_run_with_a_clear_message(superlink, tmp_path):
    outcome, run_dir = _run(superlink, tmp_path, "bad", 2, optimizer="adamw", lr=-1.0)
    assert outcome.status == "finished:failed"
    assert "optimizer='adamw' is not valid; choose one of: sgd, batch-sgd" in outcome.output
    assert "lr=-1.0 is outside the allowed range: a finite number >= 0" in outcome.output
    assert 'File "' not in outcome.output  # no traceback frames from Flower or torch
    assert not run_dir.exists()  # no work started
    # ``flwr run --stream`` can end before a finished run's last lines (the SuperLink reads the log,
    # then sees the run finished; lines stored between the two never reach the stream: once this
    # run's stream ended before its error under the suite's load). ``run`` then takes them from the
    # run's stored log; the cut is made here by hand, before the error, as it happened.
    lines = outcome.output.splitlines(keepends=True)
    first_error = next(i for i, line in enumerate(lines) if "ERROR" in line)
    missed = "".join(superlink.missed_lines(outcome.run_id, "".join(lines[:first_error])))
    assert "optimizer='adamw' is not valid; choose one of: sgd, batch-sgd" in missed
    assert missed.startswith(lines[first_error])  # from the first line the stream lacked, in order
    assert superlink.missed_lines(outcome.run_id, outcome.output) == []  # a whole stream lacks nothing


def test_the_missing_tail_is_matched_in_order_with_the_clis_lines_in_between():
    stored = "Using SuperLink: x\nA\nB\nA\nC\nINFO : Printing logstream for run_id `5`\n"
    streamed = "Using SuperLink: x\nstarted run 5\nINFO : Starting logstream for run_id `5`\nA\nB\n"
    assert missing_tail(streamed, stored) == ["A\n", "C\n"]  # the repeated line too: matched in order
    assert missing_tail(streamed + "A\nC\n", stored) == []
    assert missing_tail("", "A\nB") == ["A\n", "B\n"]
    assert missing_tail("A\n", "Using SuperLink: y\nA\n") == []  # the CLI's header is not the run's
    # a run that completed but whose stream lacks its ending line is looked up too
    assert ENDING in ending_line("finished", {"final": {"test_accuracy": 0.5}}, Path("results/r"))


def test_flwr_run_gets_the_apps_own_fab_from_a_copy_without_its_ignored_folders(tmp_path):
    """``LocalSuperLink.run`` hands ``flwr run`` a copy of the app (``stage_app``): the FAB built from
    the copy must be the FAB of the app itself, byte for byte, for this repository (whose .venv and
    results/ are ignored) and for an app with ignored folders, a nested .gitignore'd file pattern, a
    symbolic link and a .git folder."""

    from flwr.cli.build import build_fab_from_disk

    from byzflower.flower.flower_runner import stage_app

    assert build_fab_from_disk(stage_app(APP, tmp_path / "repo")) == build_fab_from_disk(Path(APP))

    app = tmp_path / "app"
    (app / "pkg" / "deep").mkdir(parents=True)
    (app / "venv" / "lib").mkdir(parents=True)
    (app / ".git").mkdir()
    (app / "pyproject.toml").write_text((Path(APP) / "pyproject.toml").read_text())
    (app / ".gitignore").write_text("venv/\n*.log\n")
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pkg" / "deep" / "model.py").write_text("X = 1\n")
    (app / "pkg" / "deep" / "notes.md").write_text("# notes\n")
    (app / "pkg" / "run.log").write_text("ignored\n")
    (app / "venv" / "lib" / "site.py").write_text("ignored = True\n")
    (app / ".git" / "config.json").write_text("{}")
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "deep" / "model.py")
    staged = stage_app(app, tmp_path / "staged")
    copied = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert ".git/config.json" in copied  # Flower puts it in the FAB: so must the copy
    assert "pkg/run.log" not in copied and not any(p.startswith("venv/") for p in copied)
    assert "pkg/link.py" not in copied and "pkg/deep/model.py" in copied
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    # a negation can take a file back from an ignored folder: then nothing is pruned
    (app / ".gitignore").write_text("venv/\n*.log\n!venv/lib/site.py\n")
    again = stage_app(app, tmp_path / "again")
    assert (again / "venv" / "lib" / "site.py").is_file()
    assert build_fab_from_disk(again) == build_fab_from_disk(app)
    with pytest.raises(FileNotFoundError, match=r"app_dir='.*nowhere' holds no pyproject\.toml"):
        stage_app(tmp_path / "nowhere", tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before anything is copied


def test_superlink_and_its_children_are_stopped():
    link = LocalSuperLink()
    link.start()
    pids = [link.process.pid, *descendants(link.process.pid)]
    link.stop()
    assert pids and not any(_alive(p) for p in pids)


def test_zero_gradient_freezes_mean_aggregation_and_gm_learns_under_gaussian(superlink, tmp_path):
    """Mini-batch SGD + GM under Gaussian through Flower gives the local engine's numbers; mean under
    zero-gradient freezes the model (checked on the local engine: the engines' parity for SGD and
    mean is shown by the runs above and the deployment tests; one Flower run fewer, ~25 s)."""
    attacked = {"attack": "zero-gradient", "aggregator": "mean", "num-byzantine": 8}
    gaussian = {**attacked, "attack": "gaussian", "aggregator": "gm", "optimizer": "batch-sgd"}
    robust, robust_dir = _run(superlink, tmp_path, "gauss-gm", 2, **gaussian)
    assert robust.ok, robust.output[-2000:]
    stuck = _local_metrics(tmp_path, "zero-mean", **attacked)
    # every message sums to zero: the mean is 0 and the model never moves
    assert {r["test_accuracy"] for r in stuck} == {stuck[0]["test_accuracy"]}
    assert stuck[-1]["attack"] == "zero-gradient" and stuck[-1]["byzantine_ids"] == list(range(20, 28))
    assert stuck[-1]["aggregate_distance"] == pytest.approx(stuck[-1]["honest_mean_norm"], rel=1e-3)
    assert "mean tolerates no Byzantine message" in stuck[0]["warnings"][0]
    learned = _metrics(robust_dir)
    assert learned[-1]["test_accuracy"] > 0.5 and learned[-1]["rule_iterations"] >= 1
    assert learned[-1]["aggregate_distance"] < learned[-1]["honest_mean_norm"]
    _close(learned, _local_metrics(tmp_path, "gauss-gm", **gaussian))  # the in-process engine's numbers


def _local_metrics(tmp_path, name, **overrides):
    from byzflower.config import resolve
    from byzflower.engine import run_local

    cfg = resolve({**BASE, **overrides, "results-dir": str(tmp_path / "local"), "run-name": name})
    assert run_local(cfg, log=lambda _: None)["status"] == "finished"
    return _metrics(tmp_path / "local" / name)


def _close(flower, local):
    """Same records from both engines, to float tolerance."""
    assert [r["iteration"] for r in flower] == [r["iteration"] for r in local]
    for a, b in zip(flower, local, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["iteration"], key)
            elif key == "suspicion":  # 4 digits of sums of shares: a last digit may round apart
                assert b[key] == pytest.approx(value, abs=2e-4), (a["iteration"], key)
            elif key not in ("rule_selected",):
                assert b[key] == value, (a["iteration"], key)


@pytest.mark.parametrize(
    ("overrides", "federation"),
    [
        (
            {
                "optimizer": "svrg",
                "attack": "gaussian",
                "aggregator": "krum",
                "num-byzantine": 5,
                "snapshot-interval": 4,
                "model": "byzflower_user_models:conv_groupnorm",
                "num-honest": 10,  # per-sample conv gradients cost: fewer workers, same paths
            },
            {"num-supernodes": 3},
        ),
        (  # MoNNA: the harness tells the strategy which worker each reply is (the pivot, worker 2)
            {
                "optimizer": "sarah",
                "attack": "label-flip",
                "aggregator": "monna",
                "monna-pivot": 2,
                "num-byzantine": 5,
                "sarah-interval": 5,
            },
            {"num-supernodes": 3},
        ),
    ],
    ids=["svrg+gaussian+user-model", "sarah+label-flip+monna"],  # SAGA: the resume test below
)
def test_local_engine_gives_the_flower_engines_numbers(superlink, tmp_path, overrides, federation):
    overrides = {**overrides, "num-server-rounds": 6, "eval-every": 3}  # past SVRG's snapshot at 5, SARAH's restart
    config = {**BASE, **overrides, "results-dir": str(tmp_path), "run-name": "flower"}
    outcome = superlink.run(APP, config, federation, timeout=400)
    assert outcome.ok, outcome.output[-3000:]
    _close(_metrics(tmp_path / "flower"), _local_metrics(tmp_path, "local", **overrides))


# `flwr stop RUN SUPERLINK` as soon as FILE exists, Flower's CLI imported beforehand (argv: RUN SUPERLINK FILE)
STOP_AFTER_FILE = """
import os, sys, time
from flwr.cli.app import app
run_id, superlink, path = sys.argv[1:4]
while not os.path.exists(path):
    time.sleep(0.01)
sys.argv = ["flwr", "stop", run_id, superlink]
sys.exit(app())
"""


def _lock_released(folder, timeout: float) -> None:
    """Wait until no process holds the run folder's lock (a run takes it for its life)."""
    from byzflower.records.results import RunDirectory

    deadline = time.monotonic() + timeout
    while RunDirectory(folder).held():
        assert time.monotonic() < deadline, "the stopped run still holds its folder"
        time.sleep(0.1)


def test_a_stopped_flower_run_resumes_from_its_checkpoint(superlink, tmp_path):
    """A named run stopped mid-way (``flwr stop``) and started again continues from its last
    checkpoint: the server's, and each node's workers' state (SAGA's tables) where it survived,
    as here (the nodes' disk is the SuperLink's folder): the uninterrupted run's numbers, those of
    the local engine. Two Ray actors (1 CPU per ClientApp) serve the 4 SuperNodes in whatever order:
    SAGA's tables live in memory-mapped files, so the numbers are those of one process holding every
    worker. (The SAGA case of the engines' parity, with MinMax and NNM in front of GM.)"""
    overrides = {
        "optimizer": "saga",
        "num-honest": 6,
        "num-byzantine": 2,
        "attack": "minmax",
        "aggregator": "gm",
        "pre-aggregator": "nnm",
        # the ServerApp stops seconds after `flwr stop` (15 to 55 rounds after the first checkpoint here;
        # one CI run's 60-round run finished first)
        "num-server-rounds": 200,
        "eval-every": 50,
        "checkpoint-every": 10,
        "eval-train-samples": 2000,
    }
    config = {**BASE, **overrides, "results-dir": str(tmp_path), "run-name": "resumed"}
    federation = {"num-supernodes": 4, "client-resources-num-cpus": 1}
    folder = tmp_path / "resumed"
    first: dict = {}
    superlink.current_run = None  # the module's last run's id until this one starts: never stop that one
    runner = threading.Thread(target=lambda: first.update(outcome=superlink.run(APP, config, federation, timeout=400)))
    runner.start()
    deadline = time.monotonic() + 300
    while superlink.current_run is None:
        assert runner.is_alive() and time.monotonic() < deadline, first
        time.sleep(0.05)
    # `flwr stop` started before the first checkpoint exists, so that it is sent right after it (a CLI
    # started then needs seconds more under load)
    checkpoint = folder / "server-checkpoint.pt"
    args = [str(superlink.current_run), superlink.name, str(checkpoint)]
    stopper = subprocess.Popen([sys.executable, "-c", STOP_AFTER_FILE, *args], env=superlink.env)
    try:
        while stopper.poll() is None:
            assert runner.is_alive() and time.monotonic() < deadline, first  # the run ended before it
            time.sleep(0.05)
        assert stopper.returncode == 0
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    runner.join(timeout=300)
    # `flwr run` returns when the SuperLink has the run stopped; its ServerApp notices seconds later
    # (9 s here): until then it runs on, holding the folder, so the run is read and restarted after
    _lock_released(folder, timeout=120)
    records = _metrics(folder)
    assert records[-1]["iteration"] < 200  # it was stopped before the end
    outcome = superlink.run(APP, config, federation, timeout=400)  # the same command again
    assert outcome.ok, outcome.output[-3000:]
    resumed = _metrics(folder)
    assert [r["iteration"] for r in resumed] == [0, 50, 100, 150, 200]  # each once
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished"
    [at] = summary["resumed_at"]  # the log says it too, but Flower's log stream can end before its last lines
    assert at % 10 == 1 and 10 < at < 200  # the iteration after a checkpoint (every 10)
    assert not (folder / "server-checkpoint.pt").exists()
    _close(resumed, _local_metrics(tmp_path, "straight", **overrides))


def test_the_quickstart_example_runs_robust_fedavg_in_flowers_simulation(superlink, tmp_path):
    """The README's RobustFedAvg example through Flower's simulation engine: Flower's quickstart shape
    (local epochs, replies with num-examples), 6 SuperNodes, one replying with N(0, 100^2) noise; the
    geometric median learns. (The README gives the same app with FedAvg's average: 0.10-0.28.)"""
    app = os.path.join(os.path.dirname(__file__), "..", "examples", "robust-fedavg")
    out = tmp_path / "gm.json"
    config = {"rule": "gm", "num-byzantine": 1, "attack": "noise", "num-server-rounds": 2, "result-file": str(out)}
    outcome = superlink.run(app, config, {"num-supernodes": 6}, timeout=400)
    assert outcome.ok, outcome.output[-3000:]
    result = json.loads(out.read_text())
    assert result["rule"] == "gm" and result["accuracy_by_round"]["2"]["accuracy"] > 0.85, result
    # detection through Flower: the one attacker's node (noise far from the honest models) is all but
    # left out by the median in both rounds, the 5 honest nodes are trusted
    scores = sorted(result["suspicion"].values(), reverse=True)
    assert len(scores) == 6 and scores[0] > 0.9 and max(scores[1:]) < 0.5, result["suspicion"]
    assert "suspicion by node (mean distrust over rounds)" in outcome.output


BYZANTINE_CLIENTS = """
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from {module}.client_app import evaluate, train as honest_train

app = ClientApp()
app.evaluate()(evaluate)


@app.train()
def train(msg, context):
    \"\"\"The app's own training, except on the first {byzantine} partitions: the model moved by 1e6.\"\"\"
    reply = honest_train(msg, context)
    if int(context.node_config["partition-id"]) < {byzantine}:
        reply.content["arrays"] = ArrayRecord([a + 1e6 for a in msg.content["arrays"].to_numpy_ndarrays()])
    return reply
"""


def test_robust_fedavg_drops_into_flowers_own_app_unmodified_but_for_the_strategy(superlink, tmp_path):
    """The app ``flwr new quickstart-numpy --framework NumPy`` writes (flwr 1.24's template, Message API:
    a 1 x 1 model of ones, each client adds U[0, 1) noise per round), with FedAvg replaced by RobustFedAvg:
    the only change to its code is that line and its import. 3 of its 10 SuperNodes reply with the
    model + 1e6 (a separate ClientApp wrapping the app's own, named in pyproject.toml). FedAvg's model
    would move ~3e5 per round; the geometric median's (in 1-D, a median) stays within the honest
    clients' [x, x + 1) each round, so after 3 rounds the model is in [1, 4)."""
    import difflib

    import numpy as np
    from flower_template import render

    app = tmp_path / "app"
    module = render(app)
    server = app / module / "server_app.py"
    flower = server.read_text()
    ours = flower.replace(
        "from flwr.serverapp.strategy import FedAvg\n",
        "from flwr.serverapp.strategy import FedAvg\nfrom strategies.robust_fedavg import RobustFedAvg\n",
    ).replace("strategy = FedAvg()", 'strategy = RobustFedAvg("gm", f=3)')
    server.write_text(ours)
    changed = [
        line
        for line in difflib.unified_diff(flower.splitlines(), ours.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert sorted(changed) == sorted(
        [
            "-    strategy = FedAvg()",
            "+from strategies.robust_fedavg import RobustFedAvg",
            '+    strategy = RobustFedAvg("gm", f=3)',
        ]
    ), changed
    (app / module / "byzantine_clients.py").write_text(BYZANTINE_CLIENTS.format(module=module, byzantine=3))
    project = app / "pyproject.toml"
    project.write_text(project.read_text().replace(f'"{module}.client_app:app"', f'"{module}.byzantine_clients:app"'))
    saved = superlink.cwd / "final_model.npz"
    saved.unlink(missing_ok=True)
    outcome = superlink.run(app, {"num-server-rounds": 3}, {"num-supernodes": 10}, timeout=300)
    assert outcome.ok, outcome.output[-3000:]
    assert "'aggregated': 10" in outcome.output and "'failed': 0" in outcome.output
    (model,) = np.load(saved).values()
    assert model.shape == (1, 1) and 1.0 <= float(model[0, 0]) < 4.0, model


# A process that runs APP on a SuperLink of its own joined to a Ray cluster (argv: ADDRESS CONFIG-JSON)
RUN_AND_WAIT = """
import json, sys
from byzflower.flower.flower_runner import LocalSuperLink
link = LocalSuperLink(ray_address=sys.argv[1])
link.start()
print(link.process.pid, link.home, link.watchdog.process.pid, flush=True)
link.run(sys.argv[3], json.loads(sys.argv[2]), {"num-supernodes": 2}, timeout=400)
"""


def test_a_run_whose_owner_is_killed_hard_is_stopped_and_says_it_was_interrupted(ray_cluster, tmp_path):
    """SIGKILL to the process that started the SuperLink (the out-of-memory killer's way): its
    watchdog stops the SuperLink and the simulation at once, the simulation first, so that the
    ServerApp, in a thread of Flower's simulation process, unwinds and records the run as
    interrupted (it said ``running`` forever before, and the processes ran on until the next
    ``byzflower run``); the SuperLink's home is deleted. Being named, the run leaves its workers'
    state on the nodes for its resumption: in the cluster's home (``state_dir``), where the
    ClientApps run, deleted with the cluster."""
    config = {**BASE, "num-server-rounds": 5000, "num-honest": 6, "results-dir": str(tmp_path), "run-name": "k"}
    assert ray_cluster.state_dir is not None and not run_state_dir(state_key(config, 0)).exists()
    kept = ray_cluster.state_dir / state_key(config, 0)
    try:
        _kill_the_owner_and_check(config, tmp_path, ray_cluster.address)
        assert sorted(p.name for p in kept.iterdir()) == ["workers-0-2", "workers-3-5"]
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def _kill_the_owner_and_check(config: dict, tmp_path: Path, ray_address: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", RUN_AND_WAIT, ray_address, json.dumps(config), APP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid, home, watchdog = owner.stdout.readline().split()
    superlink, home, watchdog = int(pid), Path(home), int(watchdog)
    metrics = tmp_path / "k" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # iteration 10 recorded
        assert owner.poll() is None and time.monotonic() < deadline, owner.stderr.read()[-3000:]
        time.sleep(0.2)
    processes = [superlink, *descendants(superlink)]
    owner.kill()
    owner.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in [*processes, watchdog]):
        assert time.monotonic() < deadline, [p for p in processes if _alive(p)]
        time.sleep(0.2)
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "simulation process is exiting" in summary["error"]
    assert summary["iterations"] >= 10
    assert not home.exists()
