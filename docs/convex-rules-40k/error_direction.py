"""Fig. 6's off cell, measured: which way each robust rule's error points under the copies.

Every robust rule's aggregate a sits about |m| from the honest mean m under sign-flip and
zero-gradient (``mechanism.md``), yet GM and the median keep closing the gap while Krum stalls.
This splits the error e = a - m of every iteration into its part along m (``along``: e.m / |m|^2,
-1 when a = 0, so -0.5 halves the step) and its part across m (``across``: |e - along m| / |m|),
and records how much the error's direction persists from one iteration to the next (``turn``:
cos(e_t, e_{t-1})) and which honest worker carries the aggregate's largest share (for Krum: the
one message it keeps; ``same``: the fraction of iterations on which that is the previous
iteration's worker, ``distinct``: how many workers it was within the block). Averages over
blocks of ``--block`` iterations go to ``<out>/<run>.jsonl``; the run itself is an ordinary run
(same seeds and numbers as ``make convex-rules``), whose gap comes from its own ``metrics.jsonl``.

    python docs/convex-rules-40k/error_direction.py --aggregator krum --attack sign-flip
    python docs/convex-rules-40k/error_direction.py --plot   # error_direction.png / .md from the .jsonl files
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

SETTINGS = {  # make convex-rules
    "model": "logreg",
    "weight-decay": 0.01,
    "optimality-gap": True,
    "lr": 0.002,
    "eval-every": 1000,
    "optimizer": "saga",
}


def measure(aggregator: str, attack: str, rounds: int, block: int, out: Path) -> Path:
    from byzflower.config import resolve
    from byzflower.engine import LocalRun

    name = f"saga-{aggregator}-{attack}"
    cfg = resolve(
        {
            **SETTINGS,
            "aggregator": aggregator,
            "attack": attack,
            "num-server-rounds": rounds,
            "results-dir": str(out / "runs"),
            "run-name": name,
            "checkpoint-every": 0,
        }
    )
    run = LocalRun(cfg, log=lambda line: None)
    target = out / f"{name}.jsonl"
    target.write_text("")
    observe = run.recorder.observe
    sums = {"along": 0.0, "across2": 0.0, "turn": 0.0, "turns": 0, "n": 0, "mean_norm": 0.0, "error_norm": 0.0}
    sums.update(same=0, chosen=0)
    previous: list[torch.Tensor | None] = [None]
    top: list = [None]
    seen: set = set()

    def observed(t, honest, aggregate, counts, info, honest_mean=None, **kwargs):
        observe(t, honest, aggregate, counts, info, honest_mean=honest_mean, **kwargs)
        if aggregate is None or honest is None:
            return
        m = (honest.mean(dim=0) if honest_mean is None else honest_mean).double()
        e = aggregate.double() - m
        mm = float(m @ m)
        along = float(e @ m) / mm
        sums["along"] += along
        sums["across2"] += max(float(e @ e) / mm - along * along, 0.0)
        sums["mean_norm"] += math.sqrt(mm)
        sums["error_norm"] += float(e.norm())
        if previous[0] is not None:
            sums["turn"] += float(e @ previous[0]) / max(float(e.norm() * previous[0].norm()), 1e-300)
            sums["turns"] += 1
        previous[0] = e
        shares = kwargs.get("shares") or {}
        if shares:
            worker = max(shares, key=shares.get)
            sums["same"] += int(worker == top[0])
            sums["chosen"] += 1
            top[0] = worker
            seen.add(worker)
        sums["n"] += 1
        if t % block == 0:
            n = sums["n"]
            row = {
                "iteration": t,
                "along": sums["along"] / n,
                "across": math.sqrt(sums["across2"] / n),
                "turn": sums["turn"] / max(sums["turns"], 1),
                "mean_norm": sums["mean_norm"] / n,
                "error_norm": sums["error_norm"] / n,
                "same": sums["same"] / max(sums["chosen"], 1),
                "distinct": len(seen),
            }
            with target.open("a") as f:
                f.write(json.dumps(row) + "\n")
            sums.update(dict.fromkeys(sums, 0.0), turns=0, n=0, same=0, chosen=0)
            seen.clear()

    run.recorder.observe = observed
    run.run()
    return target


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(out.glob("saga-*.jsonl"))
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    lines = [
        "Means over iterations 20,001-40,000 (blocks of 500): the error e = a - m along m (e.m / \\|m\\|^2) and "
        "across it (/ \\|m\\|), how much its direction persists (cos(e_t, e_t-1)), \\|m\\|, and how often the "
        "worker with the aggregate's largest share is the previous iteration's (and how many workers were, per "
        "block).",
        "",
        "| run | along m | across m | cos(e_t, e_t-1) | \\|m\\| | same worker as before | distinct per 500 "
        "| gap at 20,000 / 40,000 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in runs:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        name = path.stem
        it = [r["iteration"] for r in rows]
        axes[0].plot(it, [r["mean_norm"] for r in rows], label=name)
        axes[1].plot(it, [r["across"] for r in rows], label=name)
        axes[2].plot(it, [r["turn"] for r in rows], label=name)
        axes[4].plot(it, [r["same"] for r in rows], label=name)
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        gaps = {r["iteration"]: r.get("optimality_gap") for r in records}
        axes[3].semilogy(list(gaps), list(gaps.values()), label=name)
        late = [r for r in rows if r["iteration"] > 20000]
        if late:
            keys = ("along", "across", "turn", "mean_norm", "same", "distinct")
            mean = {k: sum(r[k] for r in late) / len(late) for k in keys}
            lines.append(
                f"| {name} | {mean['along']:.2f} | {mean['across']:.2f} | {mean['turn']:.2f} | "
                f"{mean['mean_norm']:.2f} | {mean['same']:.2f} | {mean['distinct']:.1f} | "
                f"{gaps.get(20000, float('nan')):.3g} / {gaps.get(40000, float('nan')):.3g} |"
            )
    for path in runs:  # does a sticky choice go with a persistent error and a larger |m|?
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][10:]  # from 5,000
        if len(rows) > 2:
            lines.append(
                f"\n{path.stem}, blocks from iteration 5,000 on: correlation of 'same' with cos(e_t, e_t-1) "
                f"{_corr([r['same'] for r in rows], [r['turn'] for r in rows]):.2f}, with \\|m\\| "
                f"{_corr([r['same'] for r in rows], [r['mean_norm'] for r in rows]):.2f}."
            )
    titles = (
        "honest mean's norm |m|",
        "error across m (/ |m|)",
        "cos(e_t, e_t-1)",
        "optimality gap",
        "largest share: same worker as before",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "error_direction.png", dpi=110)
    (out / "error_direction.md").write_text("\n".join(lines) + "\n")


def _corr(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregator", default="krum")
    parser.add_argument("--attack", default="sign-flip")
    parser.add_argument("--rounds", type=int, default=40000)
    parser.add_argument("--block", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("results/error-direction"))
    parser.add_argument("--plot", action="store_true", help="draw the figure and table from the .jsonl files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(args.out)
    else:
        print(measure(args.aggregator, args.attack, args.rounds, args.block, args.out))


if __name__ == "__main__":
    main()
