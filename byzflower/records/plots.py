"""Figures of a run: loss, accuracy and variance of honest messages against iterations."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from byzflower.records.results import RunDirectory

F = TypeVar("F", bound=Callable)


def quiet_overflow(draw: F) -> F:
    """Draw without numpy's overflow warnings: a diverged run's values (1e38 and beyond) overflow
    matplotlib's log-scale margins, which is harmless there and said on the console as noise."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with np.errstate(over="ignore"):
            return draw(*args, **kwargs)

    return drawn  # type: ignore[return-value]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


@quiet_overflow
def plot_run(run: RunDirectory) -> list[str]:
    """Write loss.png, accuracy.png, variance.png (gap.png for convex runs, suspicion.png where the rule gives
    per-worker shares) into the run folder; returns the names."""
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
    last = next((r for r in reversed(records) if r.get("suspicion")), None)
    if last is not None:
        _suspicion(run, records, last, title)
        written.append("suspicion.png")
    return written


def _suspicion(run: RunDirectory, records: list[dict], last: dict, title: str) -> None:
    """Each worker's final suspicion coloured by its role, and the detection quality over time."""
    byzantine = set(last.get("byzantine_ids") or [])
    scores = last["suspicion"]
    fig, (bars, quality) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    colours = ["tab:red" if w in byzantine else "tab:blue" for w in range(len(scores))]
    bars.bar(range(len(scores)), scores, color=colours)
    bars.set_xlabel("worker (red: Byzantine, blue: honest)")
    bars.set_ylabel(f"suspicion at iteration {last['iteration']}")
    bars.set_ylim(0, 1)
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_title(title)
    for key, label in (("detection_auc", "AUC"), ("detection_precision", "precision of the top B")):
        xs, ys = _series(records, key)
        if xs:
            quality.plot(xs, ys, marker="o", markersize=3, label=label)
    quality.set_ylim(0, 1.05)
    quality.set_xlabel("iteration")
    quality.set_title("detection")
    quality.grid(alpha=0.3)
    if byzantine:
        quality.legend()
    fig.tight_layout()
    fig.savefig(run.path / "suspicion.png", dpi=100)
    plt.close(fig)
