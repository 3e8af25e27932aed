"""Seconds per iteration at the paper's MNIST scale: compute floor vs local engine vs Flower engine.

Setups (50 honest + 20 Byzantine workers, the MLP, real MNIST): SGD + mean (no attack), SAGA + GM
under the Gaussian attack, SAGA + GM under the zero-gradient attack.

- floor: the per-iteration math alone in a bare loop: the honest estimator's step for all 50
  workers, the attack, stacking the 70 messages, the aggregation rule and the model step;
- local: the in-process engine (`byzflower run --engine local`) between evaluations, with its
  bookkeeping (role-blind order, screening, per-iteration honest variance);
- flower: the Flower app in Flower's simulation engine (2 SuperNodes), steady state.

Targets (2 CPU cores): local within 1.5x of the floor; a full 15,000-iteration SAGA + GM run under
any attack in <= 5 minutes with the local engine (``--full`` runs one and times it end to end).

Usage: python benchmarks/paper_scale.py [--iterations 300] [--flower-iterations 40] [--full]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from byzflower.config import resolve
from byzflower.engine import LocalRun, run_local
from clients.attacks import HonestStats

ROOT = Path(__file__).resolve().parent.parent
SETUPS = {
    "sgd + mean, no attack": {"optimizer": "sgd", "aggregator": "mean", "attack": "none"},
    "saga + gm, gaussian": {"optimizer": "saga", "aggregator": "gm", "attack": "gaussian"},
    "saga + gm, zero-gradient": {"optimizer": "saga", "aggregator": "gm", "attack": "zero-gradient"},
}


def floor_seconds(run: LocalRun, iterations: int) -> float:
    """The same math without the engine: estimator, attack, stack, rule, step."""
    x = run.x.clone()
    lr = float(run.cfg.lr)
    ids = run.byzantine_ids
    start = time.perf_counter()
    for t in range(2, iterations + 2):
        honest = run.workers.estimator.step(x, t)
        parts = [honest]
        if ids:
            stats = HonestStats.of(honest) if run.workers.attack.omniscient else None
            parts.append(run.workers.attack.craft(ids, t, stats, run.grads.dim).to(honest))
        x = x - lr * run.rule(torch.cat(parts)).vector
    return (time.perf_counter() - start) / iterations


def local_seconds(run: LocalRun, iterations: int) -> float:
    start = time.perf_counter()
    for t in range(2, iterations + 2):
        run.step(t)
    return (time.perf_counter() - start) / iterations


def flower_seconds(overrides: dict, iterations: int, out: Path) -> float:
    from byzflower.flower.flower_runner import LocalSuperLink

    config = {
        **overrides,
        "num-server-rounds": iterations,
        "eval-every": iterations // 2,
        "results-dir": str(out),
        "run-name": "flower",
        "eval-train-samples": 1000,
    }
    with LocalSuperLink() as link:
        outcome = link.run(ROOT, config, {"num-supernodes": 2}, timeout=1800)
    if not outcome.ok:
        raise RuntimeError(outcome.output[-2000:])
    records = [json.loads(x) for x in (out / "flower" / "metrics.jsonl").read_text().splitlines()]
    return 1.0 / records[-1]["iters_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--flower-iterations", type=int, default=40, help="0 skips the Flower engine")
    parser.add_argument("--full", action="store_true", help="also run a full 15,000-iteration SAGA + GM run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in SETUPS.items():
            cfg = resolve({**overrides, "results-dir": tmp, "checkpoint-every": 0})
            run = LocalRun(cfg, log=lambda _: None)
            run.step(1)  # builds SAGA's table
            floor = floor_seconds(run, args.iterations)
            run = LocalRun(cfg, log=lambda _: None)
            run.step(1)
            local = local_seconds(run, args.iterations)
            flower = (
                flower_seconds(overrides, args.flower_iterations, Path(tmp) / label.replace(" ", ""))
                if args.flower_iterations
                else float("nan")
            )
            rows.append((label, floor, local, flower))
        print(
            f"{'setup':<28}{'floor ms/it':>12}{'local ms/it':>13}{'local/floor':>13}{'flower ms/it':>14}"
            f"{'flower/local':>14}{'15k its, local':>16}"
        )
        for label, floor, local, flower in rows:
            print(
                f"{label:<28}{floor * 1e3:>12.1f}{local * 1e3:>13.1f}{local / floor:>13.2f}{flower * 1e3:>14.0f}"
                f"{flower / local:>14.0f}{local * 15000 / 60:>13.1f} min"
            )
        print("targets: local/floor <= 1.5; a 15,000-iteration SAGA + GM run <= 5 min")
        if args.full:
            cfg = resolve(
                {
                    **SETUPS["saga + gm, gaussian"],
                    "num-server-rounds": 15000,
                    "eval-every": 500,
                    "results-dir": tmp,
                    "run-name": "full",
                    "checkpoint-every": 1000,
                }
            )
            start = time.perf_counter()
            summary = run_local(cfg, log=lambda _: None)
            wall = time.perf_counter() - start
            print(
                f"full run, saga + gm under gaussian, 15,000 iterations, evaluation every 500: {wall / 60:.1f} min "
                f"end to end (final test accuracy {summary['final']['test_accuracy']:.4f})"
            )


if __name__ == "__main__":
    main()
