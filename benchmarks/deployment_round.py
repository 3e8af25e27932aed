"""Where a deployment iteration's time goes, on real SuperLink + SuperNode processes.

Flower 1.42 starts a fresh ClientApp process for every message, so each node's message pays:
the process start and Python imports (torch, flwr, byzflower), rebuilding the node's workers
from disk (data, partition, model, memory-mapped state), and the workers' step itself; the
SuperLink and SuperNodes add polling and message passing. This script measures the parts that
can be measured alone, each in a fresh process as Flower runs them, then runs real deployments
(TLS + SuperNode authentication, as by default) on 2 and 4 SuperNodes and prints the iteration
time beside the sum of the parts; the rest is Flower's (polling, process start, the app bundle).

Usage: python benchmarks/deployment_round.py [--supernodes 2,4] [--rounds 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"optimizer": "saga", "attack": "gaussian", "num-honest": 4, "num-byzantine": 2, "seed": 3}

PARTS = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import flwr.clientapp, byzflower.flower.client_app
t2 = time.perf_counter()
from byzflower.config import resolve
from byzflower.flower.node import NodeWorkers
cfg = resolve(json.loads(sys.argv[1]))
node = NodeWorkers(cfg, 0, int(sys.argv[2]), int(sys.argv[3]))  # a new run id: no state on disk yet
t3 = time.perf_counter()
x = node.grads.initial_point()
node.honest_messages(x, 1)  # the first step fills SAGA's table
t4 = time.perf_counter()
node.honest_messages(x, 2)
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import flwr + byzflower": t2 - t1, "rebuild the node's workers": t3 - t2,
                  "first step (SAGA table)": t4 - t3, "a later step": t5 - t4}))
"""


def parts(supernodes: int, reps: int) -> dict[str, float]:
    """Median over ``reps`` fresh processes of each part, plus the process start itself."""
    runs = []
    with tempfile.TemporaryDirectory() as state:
        env = {**os.environ, "BYZFLOWER_STATE_DIR": state}
        for rep in range(reps):
            t = _time([sys.executable, "-c", "pass"], env)
            out = subprocess.run(
                [sys.executable, "-c", PARTS, json.dumps(CONFIG), str(supernodes), str(4242 + rep)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append({"python start": t, **json.loads(out.stdout.strip().splitlines()[-1])})
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _time(command: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def deployment(supernodes: int, rounds: int) -> float:
    """Seconds per iteration of a real deployment run (after the first, which fills SAGA's tables)."""
    from byzflower.flower.flower_runner import LocalDeployment

    with tempfile.TemporaryDirectory() as results, LocalDeployment(supernodes) as link:
        config = {**CONFIG, "num-server-rounds": rounds, "eval-every": 1, "eval-train-samples": 1000}
        outcome = link.run(ROOT, {**config, "results-dir": results, "run-name": "bench"}, timeout=1800)
        if not outcome.ok:
            raise SystemExit(outcome.output[-3000:])
        records = [json.loads(x) for x in (Path(results) / "bench" / "metrics.jsonl").read_text().splitlines()]
    times = [r["elapsed_s"] for r in records]
    return (times[-1] - times[1]) / (len(times) - 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", default="2,4")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    for k in (int(x) for x in args.supernodes.split(",")):
        p = parts(k, args.reps)
        per_iteration = deployment(k, args.rounds)
        # an iteration sends 2 messages per node (the Gaussian attack is omniscient: 2 phases)
        ours = p["import flwr + byzflower"] + p["rebuild the node's workers"] + p["a later step"]
        process = p["python start"] + p["import torch"]
        print(f"\n== {k} SuperNodes, SAGA + Gaussian, 4 + 2 workers: {per_iteration:.1f} s per iteration")
        for name, value in p.items():
            print(f"  {name:<30}{value:>7.2f} s  (in a fresh process, median of {args.reps})")
        per_message = process + ours
        floor = 2 * -(-k // 2) * per_message  # 2 phases, K messages each, 2 cores
        print(f"  per message: process + torch {process:.2f} s, ours (imports, rebuild, step) {ours:.2f} s")
        print(
            f"  per iteration: 2 phases x {k} messages of {per_message:.2f} s on 2 cores take at least {floor:.1f} s; "
            f"the rest of {per_iteration:.1f} s is Flower's (polling, SuperExec and ClientApp process start)"
        )


if __name__ == "__main__":
    main()
