"""Deployment: a real SuperLink and real SuperNode processes, one ClientApp process per message."""

import json
import os

import pytest

from byzflower.config import resolve
from byzflower.engine import run_local
from byzflower.flower_runner import LocalDeployment, _alive
from byzflower.harness import HarnessError, _coverage_problem

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
    deployment = LocalDeployment(supernodes=2)
    with deployment:
        outcome = deployment.run(APP, {**CONFIG, "results-dir": str(tmp_path), "run-name": "dep"}, timeout=400)
        leftover = list((deployment.home / "node-state").glob("run-*/*"))
        nodes = [n.pid for n in deployment.nodes]
    assert outcome.ok, outcome.output[-3000:]
    assert len(nodes) == 2
    assert not any(_alive(p) for p in deployment.pids)  # SuperLink, SuperNodes, ClientApps: all stopped
    assert leftover == []  # the nodes deleted the run's worker state at the end

    run_local(resolve({**CONFIG, "results-dir": str(tmp_path), "run-name": "local"}), log=lambda _: None)
    deployed, local = _metrics(tmp_path / "dep"), _metrics(tmp_path / "local")
    assert [r["iteration"] for r in deployed] == [0, 1, 2]
    assert deployed[-1]["test_accuracy"] > deployed[0]["test_accuracy"] + 0.2
    assert deployed == local  # bit for bit, across processes and machines' worth of isolation


def test_coverage_waits_for_missing_partitions_and_rejects_contradictions():
    def node(pid, k):
        return {"partition-id": pid, "num-partitions": k}

    assert _coverage_problem({}) == "no SuperNode connected"
    assert "missing [1]" in _coverage_problem({10: node(0, 3), 11: node(2, 3)})
    assert _coverage_problem({10: node(1, 2), 11: node(0, 2)}) is None
    with pytest.raises(HarnessError, match="repeated \\[0\\]"):
        _coverage_problem({10: node(0, 2), 11: node(0, 2)})
    with pytest.raises(HarnessError, match="disagree on num-partitions: \\[2, 3\\]"):
        _coverage_problem({10: node(0, 2), 11: node(1, 3)})


def test_deployment_needs_at_least_one_supernode():
    with pytest.raises(ValueError, match="supernodes=0 must be >= 1"):
        LocalDeployment(supernodes=0)
