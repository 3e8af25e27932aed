"""Figures of a run: loss, accuracy and variance of honest messages against iterations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from byzflower.records.results import RunDirectory


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run: RunDirectory) -> list[str]:
    """Write loss.png, accuracy.png, variance.png (and gap.png for convex runs) into the run folder; returns the
    names."""
    records = run.records()
    cfg = run.config()
    title = f"{cfg.get('optimizer')} + {cfg.get('aggregator')}, attack {cfg.get('attack')}"
    written = []
    panels = [
        ("loss.png", "loss", [("train_loss", "train"), ("test_loss", "test")], False),
        ("accuracy.png", "accuracy", [("train_accuracy", "train"), ("test_accuracy", "test")], False),
        ("variance.png", "variance of honest messages", [("honest_variance", "at the evaluation")], True),
    ]
    if _series(records, "optimality_gap")[0]:  # optimality-gap=true (convex runs)
        panels.append(("gap.png", "optimality gap F(x) - F(x*)", [("optimality_gap", "at the evaluation")], True))
    for filename, ylabel, series, logy in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted = False
        for key, label in series:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
                plotted = True
        if logy and any(_series(records, k)[1] for k, _ in series):
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        fig.tight_layout()
        fig.savefig(run.path / filename, dpi=100)
        plt.close(fig)
        written.append(filename)
    return written
