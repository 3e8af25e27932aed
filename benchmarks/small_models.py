"""Milliseconds per iteration for the convex experiments' small models: compute floor vs local engine.

Logistic regression with 50 honest + 20 Byzantine workers, GM under sign-flip (and SAGA + mean
without attack), on two problem sizes:
- ``ijcnn1``: IJCNN1's real shape (49,990 x 22, two logits: d = 46), from a generated file in the
  LIBSVM format (the real set needs internet once; the cost per iteration depends on the shape only);
- ``mnist``: MNIST multinomial logistic regression (d = 7,850), the convex grid run offline here.

floor: the per-iteration math alone in a bare loop (``paper_scale.floor_seconds``: estimator step,
attack, stack, rule, model step); local: the in-process engine between evaluations with its
bookkeeping. Each figure is the best of ``--repeats`` blocks (this machine's timings wander by 30%).
Target (issue 12, 2 cores): a 40,000-iteration run in <= 30 s, i.e. 0.75 ms per iteration.

Usage: python benchmarks/small_models.py [--iterations 300] [--repeats 3] [--sets ijcnn1,mnist]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from paper_scale import floor_seconds  # noqa: E402

from byzflower.config import resolve  # noqa: E402
from byzflower.engine import LocalRun  # noqa: E402

SETUPS = {
    "sgd + gm, sign-flip": {"optimizer": "sgd", "aggregator": "gm", "attack": "sign-flip"},
    "batch-sgd + gm, sign-flip": {"optimizer": "batch-sgd", "aggregator": "gm", "attack": "sign-flip"},
    "saga + gm, sign-flip": {"optimizer": "saga", "aggregator": "gm", "attack": "sign-flip"},
    "saga + mean, none": {"optimizer": "saga", "aggregator": "mean", "attack": "none"},
}


def data_config(name: str, tmp: Path) -> dict:
    if name == "mnist":
        return {"weight-decay": 0.01, "lr": 0.002}
    from test_libsvm import place_ijcnn1  # the tests' generator: IJCNN1's sizes, LIBSVM format

    place_ijcnn1(tmp / "data" / "ijcnn1")
    return {"dataset": "ijcnn1", "data-dir": str(tmp / "data"), "weight-decay": 0.02, "lr": 0.05}


def best_of(repeats: int, seconds) -> float:
    return min(seconds() for _ in range(repeats))


def local_seconds(run: LocalRun, start: int, iterations: int) -> float:
    begin = time.perf_counter()
    for t in range(start, start + iterations):
        run.step(t)
    return (time.perf_counter() - begin) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", default="ijcnn1,mnist")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'set':<8}{'setup':<28}{'floor ms/it':>12}{'local ms/it':>13}{'local/floor':>13}{'40k its':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            base = {"model": "logreg", **data_config(name, Path(tmp)), "results-dir": tmp, "checkpoint-every": 0}
            for label, overrides in SETUPS.items():
                cfg = resolve({**base, **overrides, "num-server-rounds": 10**6, "eval-every": 10**6})
                run = LocalRun(cfg, log=lambda _: None)
                run.step(1)  # builds SAGA's table
                floor = best_of(args.repeats, lambda run=run: floor_seconds(run, args.iterations))
                run = LocalRun(cfg, log=lambda _: None)
                run.step(1)
                starts = iter(range(2, 2 + args.repeats * args.iterations, args.iterations))
                local = best_of(args.repeats, lambda run=run, s=starts: local_seconds(run, next(s), args.iterations))
                print(
                    f"{name:<8}{label:<28}{floor * 1e3:>12.2f}{local * 1e3:>13.2f}{local / floor:>13.2f}"
                    f"{local * 40000:>9.0f}s"
                )
    print("target: a 40,000-iteration run in <= 30 s (0.75 ms per iteration) on 2 cores")


if __name__ == "__main__":
    main()
