"""Through real Flower: a local SuperLink process, simulated SuperNodes, the app's ServerApp and ClientApp."""

import json
import os

import pytest

from byzflower.flower_runner import LocalSuperLink, _alive, descendants

pytestmark = pytest.mark.flower
APP = os.path.join(os.path.dirname(__file__), "..")
TIMING = {"elapsed_s", "iters_per_s"}
BASE = {"num-server-rounds": 20, "eval-every": 10, "num-honest": 20, "attack": "none", "seed": 7}


@pytest.fixture(scope="module")
def superlink():
    with LocalSuperLink() as link:
        yield link


def _run(superlink, tmp_path, name, supernodes, **overrides):
    config = {**BASE, "results-dir": str(tmp_path), "run-name": name, **overrides}
    outcome = superlink.run(APP, config, {"num-supernodes": supernodes}, timeout=400)
    return outcome, tmp_path / name


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def first_run(superlink, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    outcome, run_dir = _run(superlink, tmp, "k3-a", 3)
    return tmp, outcome, run_dir


def test_run_finishes_learns_and_writes_its_results(first_run):
    _, outcome, run_dir = first_run
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


def test_same_seed_gives_identical_metrics(superlink, first_run):
    tmp, _, run_dir = first_run
    outcome, again = _run(superlink, tmp, "k3-b", 3)
    assert outcome.ok, outcome.output[-3000:]
    assert _metrics(again) == _metrics(run_dir)


def test_one_worker_per_supernode_gives_the_same_numbers(superlink, first_run):
    tmp, _, run_dir = first_run
    outcome, per_worker = _run(superlink, tmp, "k20", 20)
    assert outcome.ok, outcome.output[-3000:]
    assert _metrics(per_worker) == _metrics(run_dir)


def test_bad_config_fails_the_run_with_a_clear_message(superlink, tmp_path):
    outcome, run_dir = _run(superlink, tmp_path, "bad", 2, optimizer="adamw", lr=-1.0)
    assert outcome.status == "finished:failed"
    assert "optimizer='adamw' is not valid; choose one of: sgd, batch-sgd" in outcome.output
    assert "lr=-1.0 must be >= 0" in outcome.output
    assert 'File "' not in outcome.output  # no traceback frames from Flower or torch
    assert not run_dir.exists()  # no work started


def test_superlink_and_its_children_are_stopped():
    link = LocalSuperLink()
    link.start()
    pids = [link.process.pid, *descendants(link.process.pid)]
    link.stop()
    assert pids and not any(_alive(p) for p in pids)
