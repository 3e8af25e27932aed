"""Server-side bookkeeping shared by every engine: evaluation, per-iteration diagnostics, records."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from byzflower.config import RunConfig
from byzflower.data import ImageData
from byzflower.records.detection import Suspicion
from byzflower.records.results import RunDirectory, RunFolderError, default_results_dir, run_name
from clients.gradients import ModelGradients
from clients.rng import derive_seed

Log = Callable[[str], None]


def name_selected(info: dict[str, Any], valid_positions: list[int], order: list[int], byzantine: list[int]) -> None:
    """Add the worker behind a rule's ``selected`` row (Krum-like rules) to its diagnostics.

    The rule picked a row among the valid messages; ``valid_positions`` maps rows to positions in
    the role-blind ``order`` the messages arrived in, which maps positions to workers.
    """
    if "selected" not in info:
        return
    position = valid_positions[int(info["selected"])]
    if position < len(order):
        worker = order[position]
        info["selected_worker"] = worker
        info["selected_byzantine"] = int(worker in byzantine)


class Evaluator:
    """Loss and accuracy on the whole test set and on the training set (or a fixed sample of it)."""

    def __init__(
        self, cfg: RunConfig, data: ImageData, grads: ModelGradients, device: torch.device, objective: Any = None
    ) -> None:
        self.grads = grads
        self.objective = objective  # with ``gap(x)``: the optimality gap is recorded too
        self.test = (data.inputs(data.test_images).to(device), torch.from_numpy(data.test_labels).to(device))
        n = int(cfg["eval-train-samples"])
        idx = np.arange(len(data.train_labels))
        if 0 < n < len(idx):
            rng = np.random.default_rng(derive_seed(int(cfg["seed"]), "eval-train") % 2**32)
            idx = np.sort(rng.choice(idx, size=n, replace=False))
        self.train = (
            data.inputs(data.train_images[idx]).to(device),
            torch.from_numpy(data.train_labels[idx]).to(device),
        )

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        x = x.to(self.test[0].device)
        test_loss, test_acc = self.grads.evaluate(x, *self.test)
        train_loss, train_acc = self.grads.evaluate(x, *self.train)
        out = {
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
        }
        if self.objective is not None:
            out["optimality_gap"] = self.objective.gap(x)
        return out


class Recorder:
    """Collects what each iteration shows and writes one record per evaluation.

    Records hold: iteration, elapsed seconds, iterations/s over the interval, test/train loss
    and accuracy, the variance of the honest messages at that iteration and averaged over the
    interval, the distance from the aggregate to the honest mean, dropped/failed counts over
    the interval, the rule's latest diagnostics, the attack and the Byzantine worker ids.
    """

    def __init__(self, cfg: RunConfig, evaluator: Evaluator, log: Log, run: RunDirectory | None = None) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self.log = log
        if run is None:
            root = cfg["results-dir"] or default_results_dir()
            run = RunDirectory.create(root, cfg["run-name"] or run_name(cfg.resolved()), cfg.resolved())
        self.run = run
        self.started = time.perf_counter()
        self._interval_start = self.started
        self._eval_seconds = 0.0
        self._last_eval_iteration = 0
        self._reset_interval()
        self.last_record: dict[str, Any] | None = None
        self.byzantine_ids: list[int] = []
        self.warnings: list[str] = []
        self.resumed_at: list[int] = []
        self.totals: dict[str, float] = {}  # dropped / failed counts over the whole run
        self.suspicion = Suspicion(cfg.num_workers)  # detection: per-worker running suspicion
        self.finished = False
        self._centred: torch.Tensor | None = None  # reused: a fresh (H, d) tensor each iteration page-faults

    def _reset_interval(self) -> None:
        self._variances: list[float] = []
        self._missing: set[int] = set()
        self._rebuilt: set[int] = set()
        self._counts: dict[str, float] = {}
        self._latest: dict[str, Any] = {}

    def observe(
        self,
        iteration: int,
        honest: torch.Tensor | None,
        aggregate: torch.Tensor | None,
        counts: dict[str, float],
        rule_info: dict[str, float],
        honest_mean: torch.Tensor | None = None,
        missing: list[int] | None = None,
        shares: dict[int, float] | None = None,
        rebuilt: list[int] | None = None,
    ) -> None:
        """Note one iteration: the honest messages (H, d) (and their mean, when known), the
        aggregate (d,), strategy counts, the workers whose message did not arrive, the workers
        resumed without their checkpoint's state (Flower: their nodes kept none).

        The figures stay tensors on the messages' device until an evaluation reads them, so
        observing an iteration never waits for a GPU."""
        if missing:
            self._missing.update(missing)
        if rebuilt:
            self._rebuilt.update(rebuilt)
            self.totals["rebuilt-workers"] = self.totals.get("rebuilt-workers", 0) + len(rebuilt)
        if shares:  # each aggregated worker's share of the aggregate (detection)
            self.suspicion.observe(shares)
        for k, v in counts.items():
            self._counts[k] = self._counts.get(k, 0) + v
            self.totals[k] = self.totals.get(k, 0) + v
        latest: dict[str, Any] = {f"rule_{k.replace('-', '_')}": v for k, v in rule_info.items()}
        if honest is not None and honest.shape[0] > 0:
            mean = honest.mean(dim=0) if honest_mean is None else honest_mean
            variance = torch.linalg.vector_norm(self._minus(honest, mean)).square().double() / honest.shape[0]
            self._variances.append(variance)
            latest["honest_variance"] = variance
            latest["honest_mean_norm"] = mean.norm()
            if aggregate is not None:
                latest["aggregate_distance"] = (aggregate.to(mean.device) - mean).norm()
        self._latest = latest

    def _minus(self, honest: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """honest - mean, written into a buffer kept between iterations (measured in the engine on
        MNIST's logistic regression: 0.7 ms for a fresh 50 x 7,850 result, most of it page faults)."""
        buf = self._centred
        if buf is None or buf.shape != honest.shape or buf.dtype != honest.dtype or buf.device != honest.device:
            buf = self._centred = torch.empty_like(honest)
        return torch.sub(honest, mean, out=buf)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep recording as if it had never stopped."""
        interval = self.interval_state()
        return {
            **interval,
            "variances": _floats(interval["variances"]),
            "missing": sorted(interval["missing"]),
            "rebuilt": sorted(interval["rebuilt"]),
            "latest": _plain(interval["latest"]),
            "last_eval_iteration": self._last_eval_iteration,
            "elapsed": time.perf_counter() - self.started,
            "eval_seconds": self._eval_seconds,
            "resumed_at": list(self.resumed_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_interval_state(
            {
                **state,
                "missing": state.get("missing", []),
                "rebuilt": state.get("rebuilt", []),
                "totals": state.get("totals", {}),
            }
        )
        self._last_eval_iteration = int(state["last_eval_iteration"])
        self.started = time.perf_counter() - float(state["elapsed"])
        self._interval_start = time.perf_counter()
        self._eval_seconds = float(state["eval_seconds"])
        self.resumed_at = [int(t) for t in state.get("resumed_at", [])]

    def resumed(self, iteration: int) -> None:
        """Note that the run goes on from a checkpoint at ``iteration`` (kept in the summary)."""
        self.resumed_at.append(int(iteration))
        self.log(f"resuming {self.run.path} at iteration {iteration}")

    def interval_state(self) -> dict[str, Any]:
        """What the current interval has gathered (to take back a speculative segment)."""
        return {
            "variances": list(self._variances),
            "counts": dict(self._counts),
            "missing": set(self._missing),
            "rebuilt": set(self._rebuilt),
            "totals": dict(self.totals),
            "latest": dict(self._latest),
            "suspicion": self.suspicion.state_dict(),
        }

    def load_interval_state(self, state: dict[str, Any]) -> None:
        self._variances = list(state["variances"])
        self._counts = dict(state["counts"])
        self._missing = set(state["missing"])
        self._rebuilt = set(state["rebuilt"])
        self.totals = dict(state["totals"])
        self._latest = dict(state["latest"])
        if "suspicion" in state:
            self.suspicion.load_state_dict(state["suspicion"])

    def due(self, iteration: int) -> bool:
        return (
            iteration == 0
            or iteration % int(self.cfg["eval-every"]) == 0
            or iteration == int(self.cfg["num-server-rounds"])
        )

    def evaluate(self, iteration: int, x: torch.Tensor) -> dict[str, Any]:
        now = time.perf_counter()
        steps = iteration - self._last_eval_iteration
        busy = now - self._interval_start
        t0 = time.perf_counter()
        metrics = self.evaluator(x)
        self._eval_seconds += time.perf_counter() - t0
        self._latest = _plain(self._latest)
        variances = _floats(self._variances)
        record: dict[str, Any] = {
            "iteration": iteration,
            "elapsed_s": round(now - self.started, 3),
            "iters_per_s": steps / busy if steps and busy > 0 else None,
            **metrics,
            "honest_variance": self._latest.get("honest_variance"),
            "honest_variance_interval_mean": float(np.mean(variances)) if variances else None,
            "honest_mean_norm": self._latest.get("honest_mean_norm"),
            "aggregate_distance": self._latest.get("aggregate_distance"),
            "attack": self.cfg["attack"],
            "byzantine_ids": list(self.byzantine_ids),
            "missing_workers": sorted(self._missing),
            "rebuilt_workers": sorted(self._rebuilt),
            **{k: v for k, v in self._latest.items() if k.startswith("rule_")},
            **{k.replace("-", "_"): v for k, v in self._counts.items()},
        }
        scores = self.suspicion.scores()
        if scores is not None:
            record["suspicion"] = [round(float(v), 4) for v in scores]
            record.update(self.suspicion.quality(self.byzantine_ids))
        if iteration == 0 and self.warnings:
            record["warnings"] = list(self.warnings)
        self.run.append(record)
        self.last_record = record
        self.log(_line(record, int(self.cfg["num-server-rounds"])))
        self._last_eval_iteration = iteration
        self._interval_start = time.perf_counter()
        self._reset_interval()
        return record

    def begin(self, iteration: int) -> None:
        """The run goes from ``iteration`` on: summary.json says 'running' until ``finish``."""
        records = self.run.records()
        self.run.begin(
            {
                "iterations": records[-1]["iteration"] if records else 0,
                "starts_at": int(iteration),
                "resumed_at": list(self.resumed_at),
                "config": self.cfg.resolved(),
            }
        )

    def finish(self, status: str, error: str | None = None) -> dict[str, Any]:
        records = self.run.records()
        final = records[-1] if records else {}
        best = max((r.get("test_accuracy") or 0.0 for r in records), default=None)
        summary = {
            "status": status,
            "error": error,
            "iterations": final.get("iteration", 0),
            "wall_s": round(time.perf_counter() - self.started, 3),
            "evaluation_s": round(self._eval_seconds, 3),
            "final": final,
            "best_test_accuracy": best,
            "totals": {k.replace("-", "_"): v for k, v in self.totals.items()},
            "warnings": list(self.warnings) + self._fault_warnings(),
            "resumed_at": list(self.resumed_at),  # iterations a resumed run went on from, in order
            "config": self.cfg.resolved(),
        }
        from byzflower.records.plots import plot_run  # matplotlib: only when a run ends

        written = "summary.json"
        try:
            self.run.write_json("summary.json", summary)
            written = "the figures"
            plot_run(self.run)
        except OSError as exc:  # a full or lost disk: say what could not be recorded, as one error
            raise RunFolderError(
                f"the run ended {status} but {written} could not be written in {self.run.path}: {exc}"
                + (f" (the run's error: {error})" if error else "")
            ) from exc
        finally:
            self.run.unlock()
            self.finished = True
        return summary

    def _fault_warnings(self) -> list[str]:
        """What went wrong in rounds over the whole run, in words (also logged)."""
        out = []
        failed = int(self.totals.get("failed", 0))
        if failed:
            out.append(f"{failed} round(s) failed and left the model unchanged (see failed_* in metrics.jsonl)")
        lost = int(self.totals.get("missing-messages", 0))
        if lost:
            out.append(f"{lost} worker message(s) never arrived (see missing_workers in metrics.jsonl)")
        rebuilt = int(self.totals.get("rebuilt-workers", 0))
        if rebuilt:
            out.append(
                f"{rebuilt} worker(s) resumed without their checkpoint's state, rebuilt at its model (see "
                "rebuilt_workers in metrics.jsonl): their SAGA/SVRG/SARAH numbers differ from an uninterrupted run's"
            )
        dropped = {k: int(v) for k, v in self.totals.items() if k.startswith(("dropped-", "rejected-")) and v}
        if dropped:
            out.append(
                "messages dropped: " + ", ".join(f"{k.removeprefix('dropped-')} {v}" for k, v in dropped.items())
            )
        for line in out:
            self.log(f"warning: {line}")
        return out


def _floats(values: list) -> list[float]:
    """Per-iteration figures (0-d tensors, on any device, or floats) as floats: one device read."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) < len(values):
        return [float(v) for v in values]
    return torch.stack(tensors).cpu().tolist() if tensors else []


def _plain(figures: dict[str, Any]) -> dict[str, Any]:
    """The figures with 0-d tensors read as Python numbers."""
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in figures.items()}


def _fmt(value: float | None, spec: str) -> str:
    """``value`` in ``spec``; '-' where there is none (None or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def ending_line(status: str, summary: dict[str, Any], folder: Path) -> str:
    """The line a run ends with, in either engine: its status, final test accuracy and folder."""
    return f"{status}: final test accuracy {_fmt(summary['final'].get('test_accuracy'), '.4f')}; results in {folder}"


def _line(r: dict[str, Any], total: int) -> str:
    dropped = sum(v for k, v in r.items() if k.startswith("dropped_") and isinstance(v, int | float))
    parts = [
        f"iter {r['iteration']:>{len(str(total))}}/{total}",
        f"test acc {_fmt(r['test_accuracy'], '.4f')} loss {_fmt(r['test_loss'], '.4f')}",
        f"train acc {_fmt(r['train_accuracy'], '.4f')} loss {_fmt(r['train_loss'], '.4f')}",
        f"var {_fmt(r['honest_variance'], '.3e')}",
        f"{_fmt(r['iters_per_s'], '.2f')} it/s",
    ]
    if dropped:
        parts.append(f"dropped {int(dropped)}")
    return " | ".join(parts)
