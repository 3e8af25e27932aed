"""The GPU path's promises, checked on the CPU: a steady-state iteration that reads nothing back
from the device and copies nothing to it, speculation that gives the exact path's records (also
when rounds go wrong), and graph-ready estimator steps. On a GPU machine, benchmarks/gpu.py
checks the same numbers and counts the synchronisations with the CUDA profiler."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from byzflower.config import resolve
from byzflower.core import role_blind_order, role_blind_positions
from byzflower.engine import LocalRun
from byzflower.factory import device_of
from byzflower.models import build_model
from clients import attacks
from clients.gradients import ModelGradients
from clients.graphs import GraphedEstimator
from strategies import kernels

RUN = {"num-honest": 12, "num-byzantine": 4, "seed": 7, "checkpoint-every": 0}
# ops that make the host wait for the device's values, or build tensors from host data
HOST_ROUND_TRIPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "lift_fresh", "unique"}


class HostRoundTrips(TorchDispatchMode):
    """Counts the ops of HOST_ROUND_TRIPS (and indexing with boolean masks) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None
        )
        if name in HOST_ROUND_TRIPS or name.startswith("unique") or masked:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _run(tmp_path, name, **overrides) -> LocalRun:
    cfg = resolve({**RUN, "results-dir": str(tmp_path), "run-name": name, **overrides})
    return LocalRun(cfg, log=lambda _: None)


@pytest.mark.parametrize(
    "setup",
    [
        {"optimizer": "sgd", "aggregator": "mean", "attack": "sign-flip"},
        {"optimizer": "saga", "aggregator": "mean", "attack": "zero-gradient"},
        {"optimizer": "svrg", "aggregator": "mean", "attack": "none"},
        {"optimizer": "sarah", "aggregator": "mean", "attack": "sign-flip", "sarah-restart": "fixed"},
        {"optimizer": "saga", "aggregator": "mean", "attack": "gaussian"},
        {"optimizer": "batch-sgd", "aggregator": "median", "attack": "sign-flip"},
        {"optimizer": "sgd", "aggregator": "meamed", "attack": "sign-flip"},
        {"optimizer": "batch-sgd", "aggregator": "mean", "attack": "sign-flip", "model": "cnn"},
        {"optimizer": "saga", "aggregator": "median", "attack": "none", "model": "cnn"},
    ],
    ids=lambda s: f"{s['optimizer']}-{s['aggregator']}-{s['attack']}" + (f"-{s['model']}" if "model" in s else ""),
)
def test_a_steady_state_iteration_reads_nothing_back(tmp_path, mnist, monkeypatch, setup):
    """With the device-side branches (what a GPU takes), an iteration is kernels only: no value read
    back, no data-dependent shape, no tensor built from host data, no boolean mask; the Gaussian
    attack's noise included (drawn by kernels from a counter, not on the host)."""
    monkeypatch.setattr(kernels, "reads_are_free", lambda t: False)
    monkeypatch.setattr(attacks, "draws_inline", lambda device: True)
    run = _run(tmp_path, "steady", **setup, **{"num-server-rounds": 20})
    run.speculate = True
    for t in range(1, 4):  # SAGA fills its table, SVRG takes its snapshot, SARAH restarts
        run.step(t)
    with HostRoundTrips() as probe:
        for t in range(4, 7):
            run.step(t)
    assert probe.seen == []
    assert run.workers.estimator.prepare(run.x, 7)  # and the estimator's step is capturable


@pytest.mark.parametrize("aggregator", ["gm", "krum"])
def test_a_gram_rule_reads_the_device_once_per_round(tmp_path, mnist, monkeypatch, aggregator):
    """The geometric median and Krum decide on the host from the n x n Gram matrix: on the device
    branch that matrix and its centre come back in one read (no survey read before it), and the
    geometric median's weights go back in one copy. Nothing else leaves or enters the device."""
    monkeypatch.setattr(kernels, "reads_are_free", lambda t: False)
    monkeypatch.setattr(attacks, "draws_inline", lambda device: True)
    reads = []
    blind = kernels._blind_gram
    monkeypatch.setattr(kernels, "_blind_gram", lambda m: reads.append(m.shape) or blind(m))
    monkeypatch.setattr(kernels, "_survey", lambda m: pytest.fail("the survey's read on the device branch"))
    setup = {"optimizer": "saga", "aggregator": aggregator, "attack": "gaussian", "num-server-rounds": 20}
    run = _run(tmp_path, "gram", **setup)
    run.speculate = True
    for t in range(1, 4):
        run.step(t)
    with HostRoundTrips() as probe:
        for t in range(4, 7):
            run.step(t)
    assert reads == [(16, run.grads.dim)] * 6  # one Gram matrix per round, the replayed rounds none
    if aggregator == "gm":
        # on the CPU the read itself is free; the host's use of it shows as one scalar (the centre),
        # the weights' way back as one tensor built from host data. (Krum's host-side selection
        # works on host tensors, which this probe cannot tell from device ones here.)
        assert sorted(probe.seen) == ["_local_scalar_dense"] * 3 + ["lift_fresh"] * 3


def test_the_device_side_branches_give_the_host_side_numbers(tmp_path, mnist, monkeypatch):
    """finite_rows and safe_mean decide on the device on a GPU; on the same data they give the same
    answers as the host-side branches, overflowing rows and non-finite rows included."""
    m = torch.randn(9, 300)
    m[2, 5] = float("nan")
    m[4, :2] = 3e38  # finite entries whose float32 sum overflows
    m[6, 7] = float("inf")
    big = torch.full((4, 8), 3e38)
    host = (kernels.safe_mean(big), kernels.safe_mean(m[:2]))
    from strategies.aggregators import finite_rows

    host_rows = finite_rows(m)
    monkeypatch.setattr(kernels, "reads_are_free", lambda t: False)
    assert torch.equal(finite_rows(m), host_rows) and host_rows.tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1]
    assert torch.equal(kernels.safe_mean(big), host[0]) and torch.isfinite(host[0]).all()
    assert torch.equal(kernels.safe_mean(m[:2]), host[1])


def _records(run: LocalRun) -> list[dict]:
    lines = (run.run_dir.path / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "iters_per_s")} for x in lines]


def _poison(run: LocalRun, iterations: set[int]) -> None:
    """Byzantine rows of Inf and NaN at ``iterations`` (what an overflowing attack would send)."""
    craft = run.workers.attack.craft

    def poisoned(ids, t, stats, dim):
        out = craft(ids, t, stats, dim)
        if t in iterations:
            out[0] = float("inf")
            out[-1, :3] = float("nan")
        return out

    run.workers.attack.craft = poisoned


@pytest.mark.parametrize("poison", [set(), {5, 9, 23}], ids=["clean", "faulty"])
def test_speculation_records_what_the_exact_path_records(tmp_path, mnist, poison):
    """Rounds run ahead without reading back; a segment with a bad round is replayed exactly, so the
    records (dropped messages, failed rounds, numbers) are the exact path's."""
    setup = {"optimizer": "saga", "aggregator": "gm", "attack": "sign-flip", "num-server-rounds": 30, "eval-every": 7}
    exact, fast = _run(tmp_path, "exact", **setup), _run(tmp_path, "fast", **setup)
    fast.speculate = True
    for r in (exact, fast):
        _poison(r, poison)
        r.run()
    assert _records(fast) == _records(exact)
    totals = json.loads((fast.run_dir.path / "summary.json").read_text())["totals"]
    assert totals["dropped_nonfinite"] == 2 * len(poison)


def test_a_rule_that_refuses_the_blind_round_falls_back_to_the_exact_step(tmp_path, mnist):
    """Krum needs n > 2f + 2: with NaN rows screened out the exact step fails the round; the
    speculative one must reach the same outcome and records."""
    setup = {"optimizer": "sgd", "aggregator": "krum", "aggregator-f": 6, "attack": "sign-flip"}
    setup["num-server-rounds"] = 12
    exact, fast = _run(tmp_path, "exact", **setup), _run(tmp_path, "fast", **setup)
    fast.speculate = True
    for r in (exact, fast):
        _poison(r, {4})
        r.run()
    assert _records(fast) == _records(exact)
    totals = json.loads((fast.run_dir.path / "summary.json").read_text())["totals"]
    assert totals["failed"] == 1 and totals["failed_too_few"] == 1


def test_positions_come_in_blocks_with_each_iterations_order():
    block = role_blind_positions(3, 40, 5, 70)
    for i in range(5):
        order = role_blind_order(3, 40 + i, 70)
        assert [order[p] for p in block[i].tolist()] == list(range(70))


@pytest.mark.parametrize("name", ["mlp", "mlp-notebook", "cnn"])
def test_the_gradients_hold_their_tensors_on_the_models_device(name):
    """A host tensor used in the estimators' step is a host-to-device copy at every call on a GPU,
    which a CUDA graph's capture refuses: the conv nets' dense-column index once was one, and their
    steps ran eagerly on GPUs (H200, 2026-11-27). The probe above cannot see it (on the CPU every
    tensor is a host tensor); a model on the meta device shows where each held tensor lives."""
    G = ModelGradients(build_model(name, 0, (1, 28, 28), 10).to("meta"), (1, 28, 28))
    held = {k: str(v.device) for k, v in vars(G).items() if isinstance(v, torch.Tensor)}
    assert "dense_index" in held
    assert held == dict.fromkeys(held, "meta")


def test_a_gpu_run_asks_cudnn_for_float32_repeatable_convolutions(monkeypatch):
    """cuDNN's defaults (TF32 convolutions, algorithms free to sum in any order) put a conv net's GPU
    model 1e-4 from the CPU's after one iteration and two GPU runs of one seed 5e-4 apart after 20
    (H200, 2026-11-27); resolving a CUDA device turns both off, a CPU one leaves them as they are."""
    flags = {"allow_tf32": True, "deterministic": False, "benchmark": True}
    for name, value in flags.items():  # put back afterwards
        monkeypatch.setattr(torch.backends.cudnn, name, value)
    assert device_of(resolve({**RUN, "device": "cpu"})).type == "cpu"
    assert {name: getattr(torch.backends.cudnn, name) for name in flags} == flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_of(resolve({**RUN, "device": "auto"})).type == "cuda"
    assert {name: getattr(torch.backends.cudnn, name) for name in flags} == {
        "allow_tf32": False,
        "deterministic": True,
        "benchmark": False,
    }
    assert torch.backends.cudnn.conv.fp32_precision != "tf32"


def test_graph_wrapper_on_the_cpu_is_the_estimator(tmp_path, mnist):
    run = _run(tmp_path, "graphs", optimizer="saga", aggregator="mean", attack="none", **{"num-server-rounds": 9})
    wrapped = GraphedEstimator(run.workers.estimator)
    assert wrapped.fallback == "not on a CUDA device"
    saved = run.workers.estimator.state_dict()
    plain = [run.workers.estimator.step(run.x, t).clone() for t in (1, 2, 3)]
    run.workers.estimator.load_state_dict(saved)
    graphed = [wrapped.step(run.x, t).clone() for t in (1, 2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(plain, graphed, strict=True))
    assert wrapped.last_iteration == 3 and wrapped.replays == 0


def test_a_capture_that_fails_is_said_in_the_log_and_the_summary_and_the_numbers_stay(tmp_path, mnist):
    """A failed capture leaves a run on plain kernels: slower, the same numbers. It once went
    unsaid (conv nets on GPUs ran eagerly unnoticed), so a run now logs it and lists it in summary.json. The
    capture is made to run on the CPU here, where it fails as it would on a GPU that refuses it."""
    setup = {"optimizer": "saga", "aggregator": "mean", "attack": "none", "num-server-rounds": 6}
    plain = _run(tmp_path, "plain", **setup)
    plain.run()
    lines: list[str] = []
    cfg = resolve({**RUN, "results-dir": str(tmp_path), "run-name": "refused", **setup})
    run = LocalRun(cfg, log=lines.append)
    run.workers.estimator = GraphedEstimator(run.workers.estimator, report=run._report)
    run.workers.estimator.fallback = None  # as on a GPU: capture is tried at the first steady step
    summary = run.run()
    said = [w for w in summary["warnings"] if w.startswith("saga steps without CUDA graphs: CUDA graph capture failed")]
    assert len(said) == 1 and run.workers.estimator.replays == 0
    assert sum(line.startswith(f"warning: {said[0]}") for line in lines) == 1
    assert torch.equal(run.x, plain.x)
    assert _records(run) == _records(plain)


class _Refusing:
    """A rule that raises on non-finite messages (as a rule may): the blind round must fall back."""

    def __init__(self, rule) -> None:
        self.rule, self.refused = rule, 0

    def __getattr__(self, name):
        return getattr(self.rule, name)

    def __call__(self, messages):
        if not torch.isfinite(messages).all():
            self.refused += 1
            raise ValueError("non-finite messages")
        return self.rule(messages)


def test_a_rule_that_raises_on_the_blind_round_gets_the_exact_round(tmp_path, mnist):
    setup = {"optimizer": "sgd", "aggregator": "median", "attack": "sign-flip", "num-server-rounds": 12}
    exact, fast = _run(tmp_path, "exact", **setup), _run(tmp_path, "fast", **setup)
    fast.speculate = True
    fast.rule = _Refusing(fast.rule)
    for r in (exact, fast):
        _poison(r, {6})
        r.run()
    assert fast.rule.refused == 1  # the blind round raised once; the exact replay screened the rows first
    assert _records(fast) == _records(exact)
    totals = json.loads((fast.run_dir.path / "summary.json").read_text())["totals"]
    assert totals["dropped_nonfinite"] == 2
