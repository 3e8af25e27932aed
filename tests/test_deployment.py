"""Deployment: a real SuperLink and real SuperNode processes, one ClientApp process per message."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from byzflower.config import resolve
from byzflower.engine import run_local
from byzflower.flower.credentials import make_node_key
from byzflower.flower.flower_runner import LocalDeployment, _alive, descendants, reap_stale

APP = os.path.join(os.path.dirname(__file__), "..")
TIMING = {"elapsed_s", "iters_per_s"}
# SAGA keeps a per-sample table between messages, so the run only matches if every node's
# worker state survives from one ClientApp process to the next; Gaussian is omniscient (2 phases).
CONFIG = {
    "optimizer": "saga",
    "attack": "gaussian",
    "aggregator": "gm",
    "num-honest": 4,
    "num-byzantine": 2,
    "num-server-rounds": 2,
    "eval-every": 1,
    "eval-train-samples": 1000,
    "seed": 3,
}


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.flower
def test_deployment_on_real_supernodes_matches_the_local_engine(tmp_path):
    deployment = LocalDeployment(supernodes=2)  # TLS and SuperNode authentication: the default
    with deployment:
        # During the run: a node with an unregistered key, and one that does not trust our CA, try to join.
        stranger = deployment.start_node(5, deployment.node_command(0, key=make_node_key(tmp_path / "stranger")))
        no_ca = deployment.start_node(6, deployment.node_command(1, root_certificates=tmp_path / "missing.crt"))
        outcome = deployment.run(APP, {**CONFIG, "results-dir": str(tmp_path), "run-name": "dep"}, timeout=400)
        assert stranger.wait(timeout=120) != 0 and no_ca.wait(timeout=120) != 0  # both refused
        logs = [(deployment.home / f"supernode-{i}" / "supernode.log").read_text() for i in (5, 6)]
        assert "Failed to activate SuperNode" in logs[0] or "must be registered" in logs[0], logs[0][-2000:]
        assert "missing.crt" in logs[1] or "CERTIFICATE" in logs[1].upper(), logs[1][-2000:]
        leftover = list((deployment.home / "node-state").glob("run-*/*"))
        nodes = [n.pid for n in deployment.nodes[:2]]
    assert outcome.ok, outcome.output[-3000:]
    assert len(nodes) == 2 and "--insecure" not in " ".join(deployment.node_command(0))
    assert not any(_alive(p) for p in deployment.pids)  # SuperLink, SuperNodes, ClientApps: all stopped
    assert leftover == []  # the nodes deleted the run's worker state at the end

    run_local(resolve({**CONFIG, "results-dir": str(tmp_path), "run-name": "local"}), log=lambda _: None)
    deployed, local = _metrics(tmp_path / "dep"), _metrics(tmp_path / "local")
    assert [r["iteration"] for r in deployed] == [0, 1, 2]
    assert deployed[-1]["test_accuracy"] > deployed[0]["test_accuracy"] + 0.2
    assert deployed == local  # bit for bit, across processes and machines' worth of isolation


def test_deployment_needs_at_least_one_supernode():
    with pytest.raises(ValueError, match="supernodes=0 must be >= 1"):
        LocalDeployment(supernodes=0)


@pytest.mark.flower
def test_a_supernode_lost_mid_run_is_recorded_and_rejoins(tmp_path):
    """kill -9 one real SuperNode mid-run: the round goes on with the other node's workers after
    round-timeout, the missing ones are written in the records and the summary, and the restarted
    node rejoins. Without authentication (here, to keep the test short) the restarted device gets a
    new node id and takes the partition of the silent one at once; with authentication it keeps its
    id once the SuperLink has let the old session go (about a minute, measured 2026-11-25)."""
    config = {
        **CONFIG,
        "optimizer": "sgd",
        "attack": "none",
        "aggregator": "mean",
        "num-server-rounds": 3,
        "round-timeout": 25.0,
        "results-dir": str(tmp_path),
        "run-name": "faulty",
    }
    deployment = LocalDeployment(supernodes=2, insecure=True)
    metrics = tmp_path / "faulty" / "metrics.jsonl"
    result: dict = {}
    with deployment:
        runner = threading.Thread(target=lambda: result.update(outcome=deployment.run(APP, config, timeout=600)))
        runner.start()
        _wait_for(lambda: _iterations(metrics) >= 1, runner)
        killed = [deployment.nodes[1].pid, *descendants(deployment.nodes[1].pid)]
        deployment.kill_node(1)
        deployment.start_node(1)  # the device reboots and comes back
        runner.join(timeout=600)
        pids = set(deployment.pids)
    outcome = result["outcome"]
    assert outcome.ok, outcome.output[-3000:]
    records = _records(metrics)
    missing = [r["missing_workers"] for r in records]
    assert missing == [[], [], [2, 3], []]  # node 1 hosts workers 2 and 3; back for the last round
    assert "takes its place" in outcome.output  # the new node id replaced the silent one
    summary = json.loads((tmp_path / "faulty" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["totals"]["missing_messages"] == 2
    assert any("never arrived" in w for w in summary["warnings"])
    assert not any(_alive(p) for p in pids | set(killed))  # the killed node's tree too


def _records(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _iterations(path) -> int:
    records = _records(path)
    return records[-1]["iteration"] if records else -1


def _wait_for(condition, runner, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert runner.is_alive(), "the run ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.flower
def test_processes_of_a_run_killed_hard_are_stopped_at_the_next_start(tmp_path):
    """A ``byzflower run`` killed with SIGKILL cannot stop its SuperLink (a new session, so it
    survives under PID 1); its watchdog does (test_processes.py). Where the watchdog was killed too
    (a whole process group or container killed at once), the next start finds the home whose owner
    is gone, stops what it recorded by PID, and deletes the folder with the worker state in it."""
    code = (
        "import sys, time\n"
        "from byzflower.flower.flower_runner import LocalSuperLink\n"
        f"link = LocalSuperLink(home={str(tmp_path / 'byzflower-flwr-killed')!r})\n"
        "link.start()\n"
        "print(link.process.pid, link.watchdog.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    superlink, watchdog = (int(p) for p in owner.stdout.readline().split())
    (tmp_path / "byzflower-flwr-killed" / "node-state" / "run-1").mkdir(parents=True)
    os.kill(watchdog, signal.SIGKILL)
    owner.kill()
    owner.wait(timeout=30)
    assert _alive(superlink)  # orphaned, still running
    done = reap_stale(tmp_path)
    assert len(done) == 1 and str(superlink) in done[0]
    deadline = time.monotonic() + 30
    while _alive(superlink) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(superlink) and not (tmp_path / "byzflower-flwr-killed").exists()
    assert reap_stale(tmp_path) == []


@pytest.mark.flower
def test_a_ray_cluster_left_by_a_process_killed_hard_is_stopped_at_the_next_start():
    """``LocalRayCluster`` records its ``ray start`` like a SuperLink: when its owner dies with SIGKILL
    and its watchdog with it, the next start finds the home, stops the cluster's processes by PID
    and deletes the folder."""
    root = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live below it
    code = (
        "import sys, time\n"
        "from byzflower.flower.flower_runner import LocalRayCluster, _tree\n"
        f"cluster = LocalRayCluster(num_cpus=1, root={root!r})\n"
        "cluster.start()\n"
        "print(cluster.watchdog.process.pid, cluster.process.pid, *_tree(cluster.process.pid), flush=True)\n"
        "time.sleep(600)\n"
    )
    try:
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        watchdog, leader, *cluster = [int(p) for p in owner.stdout.readline().split()]
        os.kill(watchdog, signal.SIGKILL)
        owner.kill()
        owner.wait(timeout=30)
        assert len(cluster) >= 3 and _alive(leader)  # ray start, its GCS, raylet, ...: orphaned, running
        done = reap_stale(root)
        assert len(done) == 1 and str(leader) in done[0]
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in cluster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in cluster) and os.listdir(root) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_node_checkpoints_keep_two_and_restore_the_state_exactly(tmp_path, monkeypatch, mnist):
    """A named run's node keeps its workers' state of the last two checkpoint iterations; putting
    one back gives the very messages that followed it; a missing one means a rebuild."""
    import torch

    from byzflower.flower.node import NodeWorkers

    monkeypatch.setenv("BYZFLOWER_STATE_DIR", str(tmp_path))
    cfg = resolve({"optimizer": "saga", "num-honest": 4, "num-byzantine": 2, "run-name": "named", "seed": 3})
    node = NodeWorkers(cfg, 0, 2, 99)
    x = node.grads.initial_point()
    for t in (1, 2, 3):
        node.honest_messages(x + 0.01 * t, t)
        node.checkpoint(t)
    folder = next(tmp_path.glob("named-*/checkpoints-*"))
    assert sorted(p.name for p in folder.iterdir()) == ["2.pt", "3.pt"]
    following = node.honest_messages(x + 0.04, 4)
    assert node.restore(3) and torch.equal(node.honest_messages(x + 0.04, 4), following)
    assert not node.restore(1) and node.estimator.last_iteration == 0  # rebuilt at the next step
    (folder / "2.pt").write_bytes((folder / "2.pt").read_bytes()[:64])  # damaged: as if it had kept none
    assert not node.restore(2) and node.estimator.last_iteration == 0
