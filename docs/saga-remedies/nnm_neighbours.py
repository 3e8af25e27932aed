"""Why nearest-neighbour mixing hands SAGA + GM (b = 1) to identical copies: at chosen iterations of the
README's `remedy-nnm` runs (MNIST, MLP, 50 + 20 workers, seed 1), how many of each honest message's n - f = 50
mixing neighbours are attacker copies, and how far the mixed honest messages and the aggregate sit from the
honest mean against the copies.

Usage (from the repository root): python docs/saga-remedies/nnm_neighbours.py [--attack sign-flip] [--at 250,1000,3000]
Prints one table row per iteration; runs the local engine from iteration 1 (about 30 ms per iteration on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from byzflower.config import resolve
from byzflower.engine import LocalRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack", default="sign-flip")
    parser.add_argument("--at", default="250,1000,3000")
    args = parser.parse_args()
    points = sorted(int(v) for v in args.at.split(","))
    cfg = resolve(
        {
            "optimizer": "saga",
            "aggregator": "gm",
            "pre-aggregator": "nnm",
            "attack": args.attack,
            "num-server-rounds": points[-1],
            "eval-every": 10**9,
            "checkpoint-every": 0,
            "results-dir": tempfile.mkdtemp(prefix="nnm-"),
        }
    )
    run = LocalRun(cfg, log=lambda _: None)
    f = int(cfg["num-byzantine"])
    print(
        "| iteration | copies among an honest message's 50 neighbours (median, min-max) | spread | "
        "mixed honest: distance to the honest mean | copies' distance to it | aggregate's |"
    )
    print("|---|---|---|---|---|---|")
    for t in range(1, points[-1] + 1):
        if t not in points:
            run.step(t)
            continue
        honest, stats, everything = run.messages(t)
        position = run._position(t)
        bad = position.index_select(0, run._byzantine_rows)
        good = position.index_select(0, run._honest_rows)
        m = everything.double()
        d2 = torch.cdist(m, m) ** 2
        nearest = d2.argsort(dim=1)[:, : m.shape[0] - f]  # NNM: n - f nearest, itself included
        is_copy = torch.zeros(m.shape[0], dtype=torch.bool)
        is_copy[bad] = True
        counts = is_copy[nearest[good]].sum(dim=1).float()
        mixed = m[nearest].mean(dim=1)
        mean = honest.double().mean(dim=0)
        spread = float(((honest.double() - mean) ** 2).sum(dim=1).mean().sqrt())
        to_mean = (mixed[good] - mean).norm(dim=1).median()
        copy = m[bad[0]]
        aggregate = run.rule(everything).vector.double()  # nnm + gm keep no state between calls
        drawn = (honest, stats, everything)
        run.messages = lambda _t, drawn=drawn: (
            drawn
        )  # the engine's round at t on these messages (SAGA's table moved once)
        run.step(t)
        del run.messages
        print(
            f"| {t} | {counts.median():.0f} ({counts.min():.0f}-{counts.max():.0f}) | {spread:.3g} | "
            f"{float(to_mean):.3g} | {float((copy - mean).norm()):.3g} | {float((aggregate - mean).norm()):.3g} |"
        )


if __name__ == "__main__":
    main()
