"""Seconds per iteration of byzflower vs a bare Flower app doing the same exchange.

Both run through the same real local SuperLink in simulation mode: W = 70 workers, one
mini-batch SGD gradient (b = 5) per worker per iteration, mean aggregation, on 2 and on 70
simulated SuperNodes. byzflower's figure is its steady-state iterations/s over the second half
of the run (evaluation excluded); the bare app's is the mean wall time of its second-half rounds.

Usage: python benchmarks/round_overhead.py [--rounds-2 60] [--rounds-70 30]
"""

import argparse
import json
import tempfile
from pathlib import Path

from byzflower.flower.flower_runner import LocalSuperLink

ROOT = Path(__file__).resolve().parent.parent


def byzflower_seconds(link, out: Path, k: int, rounds: int) -> float:
    config = {
        "num-server-rounds": rounds,
        "eval-every": rounds // 2,
        "num-honest": 70,
        "attack": "none",
        "optimizer": "sgd",
        "aggregator": "mean",
        "results-dir": str(out),
        "run-name": f"byz-k{k}",
        "eval-train-samples": 1000,
    }
    outcome = link.run(ROOT, config, {"num-supernodes": k}, timeout=1800)
    if not outcome.ok:
        raise RuntimeError(outcome.output[-2000:])
    records = [json.loads(line) for line in (out / f"byz-k{k}" / "metrics.jsonl").read_text().splitlines()]
    return 1.0 / records[-1]["iters_per_s"]


def bare_seconds(link, out: Path, k: int, rounds: int) -> float:
    timings = out / f"bare-k{k}.json"
    outcome = link.run(
        ROOT / "benchmarks" / "bare_app",
        {"num-server-rounds": rounds, "timings": str(timings)},
        {"num-supernodes": k},
        timeout=1800,
    )
    if not outcome.ok:
        raise RuntimeError(outcome.output[-2000:])
    times = json.loads(timings.read_text())
    tail = times[len(times) // 2 :]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds-2", type=int, default=60)
    parser.add_argument("--rounds-70", type=int, default=30)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalSuperLink() as link:
        out = Path(tmp)
        for k, rounds in ((2, args.rounds_2), (70, args.rounds_70)):
            ours = byzflower_seconds(link, out, k, rounds)
            bare = bare_seconds(link, out, k, rounds)
            rows.append((k, rounds, ours, bare))
    print(f"{'supernodes':>10} {'rounds':>7} {'byzflower s/it':>15} {'bare Flower s/it':>17} {'ratio':>7}")
    for k, rounds, ours, bare in rows:
        print(f"{k:>10} {rounds:>7} {ours:>15.3f} {bare:>17.3f} {ours / bare:>7.2f}")
    print("target: ratio <= 1.20")


if __name__ == "__main__":
    main()
