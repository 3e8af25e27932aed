"""RobustFedAvg against Flower 1.42's own robust FedAvg strategies, on the same client models.

n clients reply with a model of d parameters (two arrays: d - 10 and 10), f = 20% of them far away.
For each pair it prints the time of one ``aggregate_train`` (fresh replies each time: Flower's
FedMedian pops the arrays out of the replies), the ratio, and the largest difference between the
two new models (0 where the definitions match; Bulyan's selections differ, see the test).

Usage: python benchmarks/robust_fedavg.py [--clients 20] [--dims 39760,1000000] [--reps 5]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from flwr.supercore.task_identity import TaskIdentity

from strategies.robust_fedavg import RobustFedAvg


class _Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _arrays(flat: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(flat[:-10].copy()), "b": Array(flat[-10:].copy())})


def _time(strategy, models: list[np.ndarray], start: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(reps):
        instructions = list(strategy.configure_train(1, _arrays(start), ConfigRecord({}), _Grid(len(models))))
        replies = [
            Message(RecordDict({"arrays": _arrays(m), "metrics": MetricRecord({"num-examples": 10})}), reply_to=i)
            for m, i in zip(models, instructions, strict=True)
        ]
        t = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, replies)
        best = min(best, time.perf_counter() - t)
        out = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--dims", default="39760,1000000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round INFO lines
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    n = args.clients
    f = n // 5
    pairs = {
        "median": (lambda: RobustFedAvg("median"), lambda: FedMedian()),
        "trimmed-mean": (lambda: RobustFedAvg("trimmed-mean", f=f), lambda: FedTrimmedAvg(beta=f / n)),
        "krum": (lambda: RobustFedAvg("krum", f=f), lambda: Krum(num_malicious_nodes=f)),
        "multi-krum": (
            lambda: RobustFedAvg("multi-krum", f=f, m=n - f),
            lambda: MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f),
        ),
        "bulyan": (lambda: RobustFedAvg("bulyan", f=(n - 3) // 4), lambda: Bulyan(num_malicious_nodes=(n - 3) // 4)),
        "gm (Flower has none)": (lambda: RobustFedAvg("gm"), None),
    }
    print(f"{n} clients, {f} of them far away; torch threads = {torch.get_num_threads()}")
    for d in (int(x) for x in args.dims.split(",")):
        g = np.random.default_rng(0)
        start = np.zeros(d, dtype=np.float32)
        models = [(1.0 + 0.1 * g.standard_normal(d)).astype(np.float32) for _ in range(n - f)]
        models += [(50.0 + g.standard_normal(d)).astype(np.float32) for _ in range(f)]
        print(f"\n== d = {d:,}")
        print(f"{'rule':<22}{'ours ms':>10}{'Flower ms':>11}{'x faster':>10}{'max |diff|':>12}")
        for label, (ours, theirs) in pairs.items():
            t_ours, mine = _time(ours(), models, start, args.reps)
            if theirs is None:
                print(f"{label:<22}{t_ours * 1e3:>10.1f}{'-':>11}{'-':>10}{'-':>12}")
                continue
            t_fl, flower = _time(theirs(), models, start, args.reps)
            diff = float(np.abs(mine - flower).max())
            print(f"{label:<22}{t_ours * 1e3:>10.1f}{t_fl * 1e3:>11.1f}{t_fl / t_ours:>10.2f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
