"""Paper-style reports from run folders: Table I (final test accuracy) and the figures.

Table: rows are attacks, columns optimizer x aggregator, cells the final test accuracy (as in the
paper's Table I), and the same cells beside the paper's own numbers with the difference. Figure:
one column of panels per attack; rows test accuracy, train loss (log scale) and variance of the
honest messages (log scale) against iterations; one line per optimizer + aggregator.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from byzflower.config import AGGREGATORS, ATTACKS, DEFAULTS, OPTIMIZERS
from byzflower.records.plots import quiet_overflow
from byzflower.records.results import FREE_KEYS, DamagedRunFolder, RunDirectory


@dataclass
class Run:
    path: Path
    config: dict
    records: list[dict]
    summary: dict | None
    #: the settings that set this run apart from others of its optimizer, rule and attack ('' when none
    #: do): seeds aside, runs that differ get columns of their own instead of one cell hiding the others
    variant: str = ""
    #: whether other runs of the same column and attack differ from this one only in their seed
    replicated: bool = False

    @property
    def rule(self) -> str:
        pre = self.config.get("pre-aggregator", "none")
        return self.config["aggregator"] if pre in ("none", "", None) else f"{pre}+{self.config['aggregator']}"

    @property
    def column(self) -> str:
        return f"{self.config['optimizer']} {self.rule}" + (f" {self.variant}" if self.variant else "")

    @property
    def label(self) -> str:
        """The column, and the seed where replicates share it (per-run tables and legends)."""
        return self.column + (f" seed {self.config.get('seed', DEFAULTS['seed'])}" if self.replicated else "")

    @property
    def status(self) -> str:
        return (self.summary or {}).get("status", "unfinished")

    @property
    def final_accuracy(self) -> float | None:
        if self.status != "finished" or not self.records:
            return None
        return self.records[-1].get("test_accuracy")


def collect(dirs: list[Path], say: Callable[[str], None] = print) -> list[Run]:
    """Every run folder (one holding config.json) under the given folders, in a stable order. A
    folder whose files are damaged is left out, and ``say`` names it and the file."""
    runs = []
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        for config_path in sorted(root.rglob("config.json")):
            folder = RunDirectory(config_path.parent)
            try:
                summary = folder.summary()
                if summary is not None and summary.get("status") == "running" and not folder.held():
                    summary = {**summary, "status": "no record"}  # its process ended without saying how (killed)
                runs.append(Run(folder.path, folder.config(), folder.records(), summary))
            except DamagedRunFolder as exc:
                say(f"left out of the report: {exc}")
    if not runs:
        raise FileNotFoundError(f"no run folders (with config.json) under {', '.join(map(str, dirs))}")
    _set_variants(runs)
    return runs


# never what sets runs apart in a report: where they were written, and what may change on resumption
_NOT_SETTINGS = frozenset({"run-name", "seed", "optimizer", "aggregator", "pre-aggregator", "attack"}) | FREE_KEYS


def _set_variants(runs: list[Run]) -> None:
    """Name, in each run's ``variant``, the settings in which runs of the same optimizer, rule and attack
    differ (the same keys for every run, so columns line up), and mark runs that share their column and
    attack with others as ``replicated`` (they differ in their seed only)."""
    full = [{**DEFAULTS, **r.config} for r in runs]
    groups: dict[tuple, list[dict]] = {}
    for run, config in zip(runs, full, strict=True):
        groups.setdefault((run.config["optimizer"], run.rule, run.config["attack"]), []).append(config)
    keys = sorted(
        {
            k
            for members in groups.values()
            for k in set().union(*members)
            if k not in _NOT_SETTINGS and len({repr(c.get(k)) for c in members}) > 1
        }
    )
    for run, config in zip(runs, full, strict=True):
        run.variant = " ".join(f"{k}={config.get(k)}" for k in keys)
    for members in by_cell(runs).values():
        for run in members:
            run.replicated = len(members) > 1


def by_cell(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """{(attack, column): its runs}: one run, or replicates differing in their seed only."""
    cells: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.config["attack"], run.column), []).append(run)
    return cells


def _first_per_seed(runs: list[Run]) -> tuple[list[Run], int]:
    """(the runs, one per seed, the first in path order; how many repeated a seed already counted:
    copies of one experiment, not replicates)."""
    seen: dict[object, Run] = {}
    copies = 0
    for run in sorted(runs, key=lambda r: str(r.path)):
        seed = run.config.get("seed", DEFAULTS["seed"])
        if seed in seen:
            copies += 1
        else:
            seen[seed] = run
    return list(seen.values()), copies


def _one_per_seed(runs: list[Run]) -> tuple[list[Run], int]:
    """``_first_per_seed`` of the finished runs (those with a final accuracy)."""
    return _first_per_seed([r for r in runs if r.final_accuracy is not None])


def mean_final(runs: list[Run]) -> float | None:
    """The mean final test accuracy over the seeds finished among ``runs`` (None: none finished)."""
    kept, _ = _one_per_seed(runs)
    return sum(r.final_accuracy for r in kept) / len(kept) if kept else None


def _statuses(runs: list[Run]) -> str:
    """What a cell says when none of its runs finished: their statuses ('failed', 'failed/interrupted')."""
    return "/".join(sorted({r.status for r in runs}))


def cell_text(runs: list[Run]) -> str:
    """A table cell: the final test accuracy of one run; over replicates the mean, the sample standard
    deviation and how many seeds finished; the status when none did; unfinished replicates and copies
    of a seed already counted (the same experiment run twice) said, not counted."""
    kept, copies = _one_per_seed(runs)
    done = [r.final_accuracy for r in kept]
    if not done:
        return _statuses(runs)
    mean = sum(done) / len(done)
    text = f"{mean:.4f}"
    if len(done) > 1:
        std = math.sqrt(sum((a - mean) ** 2 for a in done) / (len(done) - 1))
        text += f" ± {std:.4f} (n={len(done)})"
    unfinished = sum(r.final_accuracy is None for r in runs)
    if unfinished:
        text += f" (+{unfinished} unfinished)"
    if copies:
        text += f" (+{copies} of a seed already counted)"
    return text


def _rank(value: str, reference: tuple[str, ...]) -> tuple[int, str]:
    return (reference.index(value) if value in reference else len(reference), value)


def _ordered(values: set[str], reference: tuple[str, ...]) -> list[str]:
    return sorted(values, key=lambda v: _rank(v, reference))


def _by_column_then_attack(run: Run) -> tuple:
    """Sort key of per-run tables: the column, then the attack in ATTACKS' order (none first)."""
    return run.column, _rank(run.config["attack"], ATTACKS)


def table(runs: list[Run]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """(attacks, columns, cells): cells[(attack, column)] is the final test accuracy as text."""
    attacks = _ordered({r.config["attack"] for r in runs}, ATTACKS)
    columns = sorted({r.column for r in runs}, key=lambda c: _column_rank(c, runs))
    cells = {key: cell_text(members) for key, members in by_cell(runs).items()}
    return attacks, columns, cells


def _column_rank(column: str, runs: list[Run]) -> tuple:
    """Optimizers, then rules, in the config's order; a pre-aggregated rule after its plain one."""
    run = next(r for r in runs if r.column == column)
    return (
        _rank(run.config["optimizer"], OPTIMIZERS),
        _rank(run.config["aggregator"], AGGREGATORS),
        run.rule != run.config["aggregator"],  # pre-aggregated
        column,
    )


def markdown(attacks: list[str], columns: list[str], cells: dict) -> str:
    lines = ["| attack | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for attack in attacks:
        lines.append(f"| {attack} | " + " | ".join(cells.get((attack, c), "-") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(attacks: list[str], columns: list[str], cells: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["attack", *columns])
    for attack in attacks:
        writer.writerow([attack, *(cells.get((attack, c), "") for c in columns)])
    return buf.getvalue()


# The paper's Table I (Wu et al. 2020): final test accuracy in %, 50 + 20 workers, 15,000 iterations.
PAPER_TABLE_I: dict[str, dict[str, float]] = {
    "none": {
        "sgd mean": 97.0,
        "sgd gm": 92.3,
        "batch-sgd mean": 98.6,
        "batch-sgd gm": 98.0,
        "saga mean": 96.5,
        "saga gm": 96.3,
    },
    "gaussian": {
        "sgd mean": 36.3,
        "sgd gm": 92.5,
        "batch-sgd mean": 36.3,
        "batch-sgd gm": 98.0,
        "saga mean": 14.5,
        "saga gm": 96.4,
    },
    "sign-flip": {
        "sgd mean": 0.11,
        "sgd gm": 0.03,
        "batch-sgd mean": 0.16,
        "batch-sgd gm": 90.3,
        "saga mean": 0.12,
        "saga gm": 86.4,
    },
    "zero-gradient": {
        "sgd mean": 9.94,
        "sgd gm": 26.2,
        "batch-sgd mean": 9.89,
        "batch-sgd gm": 81.5,
        "saga mean": 9.88,
        "saga gm": 92.4,
    },
}


def beside_paper(runs: list[Run]) -> str | None:
    """Markdown: each of the paper's Table I cells that the runs cover, as 'ours (paper, difference)' in
    percentage points; None when no run is one of its cells. A line above the table says which model,
    data set, workers and iterations the runs used, so settings other than the paper's show."""
    ours: dict[tuple[str, str], float | str] = {}
    for (attack, column), members in by_cell(runs).items():
        if members[0].config.get("model") == "logreg":  # Table I is the neural network; logreg is Figs. 3-6
            continue
        if column in PAPER_TABLE_I.get(attack, {}):
            acc = mean_final(members)  # over seeds, where several ran
            ours[(attack, column)] = acc * 100 if acc is not None else _statuses(members)
    if not ours:
        return None
    attacks = [a for a in PAPER_TABLE_I if any(k[0] == a for k in ours)]
    columns = [c for c in PAPER_TABLE_I["none"] if any(k[1] == c for k in ours)]
    settings = sorted(
        {
            f"model {r.config.get('model')}, {r.config.get('dataset')}, {r.config.get('num-honest')} + "
            f"{r.config.get('num-byzantine')} workers, {r.config.get('num-server-rounds')} iterations, "
            f"seed {r.config.get('seed')}"
            for r in runs
            if (r.config["attack"], r.column) in ours
        }
    )
    lines = [
        "Final test accuracy in %: ours (the paper's Table I, ours minus the paper's in points). Runs: "
        + "; ".join(settings)
        + ".",
        "",
        "| attack | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for attack in attacks:
        cells = []
        for column in columns:
            value, paper = ours.get((attack, column)), PAPER_TABLE_I[attack][column]
            if value is None:
                cells.append(f"- ({paper:g})")
            elif isinstance(value, str):
                cells.append(f"{value} ({paper:g})")
            else:
                cells.append(f"{value:.2f} ({paper:g}, {value - paper:+.1f})")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def worst_case(runs: list[Run]) -> str | None:
    """Markdown: per optimizer + rule, the worst final test accuracy over the attacks run against it
    and which attack achieved it, beside its accuracy without attack; None unless some column met
    at least two attacks. Unfinished runs are listed, never counted as a result."""
    columns = _ordered({r.column for r in runs}, ())
    cells = by_cell(runs)
    rows = []
    for column in columns:
        mine = {a: members for (a, c), members in cells.items() if c == column and a != "none"}
        done = [(mean_final(m), a) for a, m in mine.items() if mean_final(m) is not None]
        if len(mine) < 2:
            continue
        clean = mean_final(cells.get(("none", column), []))
        clean_text = f"{clean:.4f}" if clean is not None else "-"
        missing = sorted(a for a, m in mine.items() if mean_final(m) is None)
        worst = min(done) if done else None
        rows.append((worst[0] if worst else 2.0, column, clean_text, worst, len(done), missing))
    if not rows:
        return None
    lines = [
        "Worst final test accuracy over the attacks run against each rule (lowest first).",
        "",
        "| optimizer rule | no attack | worst under attack | by | attacks finished | not finished |",
        "|---|---|---|---|---|---|",
    ]
    for _, column, clean_text, worst, finished, missing in sorted(rows):
        worst_text, by = (f"{worst[0]:.4f}", worst[1]) if worst else ("-", "-")
        lines.append(f"| {column} | {clean_text} | {worst_text} | {by} | {finished} | {', '.join(missing) or '-'} |")
    return "\n".join(lines) + "\n"


def detection(runs: list[Run]) -> str | None:
    """Markdown: per optimizer + rule (rows) and attack (columns), the final detection AUC (and the
    precision of the top B); None when no run recorded detection."""
    scored = [r for r in runs if r.final_accuracy is not None and r.records[-1].get("detection_auc") is not None]
    if not scored:
        return None
    attacks = _ordered({r.config["attack"] for r in scored}, ATTACKS)
    columns = _ordered({r.column for r in scored}, ())
    cells = {}
    for (attack, column), cell in by_cell(scored).items():  # replicates: the mean over their seeds
        members, _ = _one_per_seed(cell)
        auc = sum(r.records[-1]["detection_auc"] for r in members) / len(members)
        precision = sum(r.records[-1]["detection_precision"] for r in members) / len(members)
        cells[(column, attack)] = f"{auc:.2f} / {precision:.2f}"
    lines = [
        "Detection at the last evaluation: AUC / precision of the B most suspected workers (1 / 1: every attacker "
        "is more suspected than every honest worker; 0.5: no better than chance; - : the rule gives no shares, or "
        "the run did not finish).",
        "",
        "| optimizer rule | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for column in columns:
        lines.append(f"| {column} | " + " | ".join(cells.get((column, a), "-") for a in attacks) + " |")
    return "\n".join(lines) + "\n"


def heatmap(runs: list[Run], path: Path) -> None:
    """Final test accuracy per optimizer + rule (rows) and attack (columns), annotated."""
    attacks = _ordered({r.config["attack"] for r in runs}, ATTACKS)
    columns = _ordered({r.column for r in runs}, ())
    grid = [[float("nan")] * len(attacks) for _ in columns]
    for (attack, column), members in by_cell(runs).items():  # replicates: the mean over their seeds
        acc = mean_final(members)
        if acc is not None:
            grid[columns.index(column)][attacks.index(attack)] = acc
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(attacks), 1.0 + 0.45 * len(columns)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right")
    ax.set_yticks(range(len(columns)), columns)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            text = "-" if value != value else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="final test accuracy")
    ax.set_title("rule x attack (- : not run or not finished)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Curve:
    """One line of the report's figure: a column's values of one record key against iterations.

    Over replicates (seeds of one cell) ``values`` is their mean at the iterations every seed recorded
    and ``low`` / ``high`` the lowest and highest seed's value there (the figure's band); for one run
    they are None."""

    column: str
    iterations: list[int]
    values: list[float]
    low: list[float] | None
    high: list[float] | None
    seeds: int


def curves(runs: list[Run], attack: str, key: str) -> list[Curve]:
    """The figure's lines for ``attack`` and the record ``key``: one per column, in column order. A
    seed recorded twice (the same experiment run twice) counts once, the first in path order, as in the
    tables; where some seeds finished, the figure shows those (the tables' mean), else every seed."""
    lines = []
    for (cell_attack, column), members in sorted(by_cell(runs).items(), key=lambda item: item[0][1]):
        if cell_attack != attack:
            continue
        finished = [r for r in members if r.final_accuracy is not None]
        recorded = [r for r in finished or members if any(rec.get(key) is not None for rec in r.records)]
        kept, _ = _first_per_seed(recorded)
        series = [{r["iteration"]: r[key] for r in run.records if r.get(key) is not None} for run in kept]
        if not series:
            continue
        iterations = sorted(set(series[0]).intersection(*series[1:]))
        if not iterations:
            continue
        at = [[s[i] for s in series] for i in iterations]
        values = [math.fsum(v) / len(v) for v in at]
        if len(series) == 1:
            lines.append(Curve(column, iterations, values, None, None, 1))
        else:
            lines.append(Curve(column, iterations, values, [min(v) for v in at], [max(v) for v in at], len(series)))
    return lines


@quiet_overflow
def figure(runs: list[Run], path: Path) -> None:
    """One column of panels per attack, one line per optimizer + rule; replicates as their mean over
    seeds with a band from the lowest to the highest seed."""
    attacks = _ordered({r.config["attack"] for r in runs}, ATTACKS)
    panels = [
        ("test_accuracy", "test accuracy", False),
        ("train_loss", "train loss", True),
        ("honest_variance", "variance of honest messages", True),
    ]
    if any(r.get("optimality_gap") is not None for run in runs for r in run.records):  # convex runs (Figs. 3-6)
        panels.insert(0, ("optimality_gap", "optimality gap F(x) - F(x*)", True))
    fig, axes = plt.subplots(len(panels), len(attacks), figsize=(4.2 * len(attacks), 3.2 * len(panels)), squeeze=False)
    columns = sorted({r.column for r in runs})
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(columns)}
    seeds: dict[str, int] = {}
    for j, attack in enumerate(attacks):
        for i, (key, label, logy) in enumerate(panels):
            ax = axes[i][j]
            for curve in curves(runs, attack, key):
                colour = colours[curve.column]
                ax.plot(curve.iterations, curve.values, color=colour)
                if curve.low is not None:
                    ax.fill_between(curve.iterations, curve.low, curve.high, color=colour, alpha=0.2, lw=0)
                seeds[curve.column] = max(seeds.get(curve.column, 1), curve.seeds)
            if logy:
                ax.set_yscale("log")
            if i == 0:
                ax.set_title(f"attack: {attack}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(panels) - 1:
                ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    names = [c + (f" (mean of {seeds[c]} seeds, band min-max)" if seeds.get(c, 1) > 1 else "") for c in columns]
    handles = [plt.Line2D([], [], color=colours[c]) for c in columns]
    fig.legend(handles, names, loc="lower center", ncol=min(len(columns), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def copies_distance_factor(config: dict) -> float | None:
    """Where identical-copy attacks put their copies, as a multiple of ||honest mean|| away from the
    honest mean: sign-flip sends scale * mean (|scale - 1|), zero-gradient -(H / B) * mean (H / B + 1);
    None for other attacks."""
    value = {**DEFAULTS, **config}.get
    if config.get("attack") == "sign-flip":
        return abs(float(value("attack-scale")) - 1.0)
    if config.get("attack") == "zero-gradient":
        return int(value("num-honest")) / int(value("num-byzantine")) + 1.0
    return None


def _late_median(run: Run, value) -> float:
    """The median of ``value(record)`` over the evaluations of the run's last third."""
    last = run.records[-1]["iteration"] if run.records else 0
    vals = sorted(value(r) for r in run.records if r["iteration"] > 2 * last / 3 and r.get("honest_mean_norm"))
    return vals[len(vals) // 2] if vals else float("nan")


@quiet_overflow
def mechanism(runs: list[Run], path: Path) -> str | None:
    """Where identical copies (sign-flip, zero-gradient) hold a robust rule: per run, against iterations
    on a log scale, the honest messages' spread (sqrt of their variance), the copies' distance from the
    honest mean, the honest mean's norm (the honest gradient the step does not follow) and the
    aggregate's distance from the honest mean; written to ``path``. Returns a Markdown table of the
    same figures (medians over the last third of the iterations) with the final accuracy, no-attack
    runs included for reference; None without such runs. The mean rule is left out."""
    chosen = [r for r in runs if copies_distance_factor(r.config) is not None and r.config["aggregator"] != "mean"]
    if not chosen:
        return None
    attacks = _ordered({r.config["attack"] for r in chosen}, ATTACKS)
    columns = sorted({r.column for r in chosen})
    fig, axes = plt.subplots(
        len(attacks), len(columns), figsize=(3.6 * len(columns), 3.0 * len(attacks)), squeeze=False
    )
    for i, attack in enumerate(attacks):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            # replicates: the first in path order, its seed in the title (the table below lists each)
            here = [r for r in chosen if (r.config["attack"], r.column) == (attack, column)]
            run = min(here, key=lambda r: str(r.path)) if here else None
            if run is None:
                ax.set_axis_off()
                continue
            factor = copies_distance_factor(run.config)
            recs = [r for r in run.records if r.get("honest_mean_norm") is not None]
            its = [r["iteration"] for r in recs]
            ax.plot(its, [max(r["honest_variance"], 1e-30) ** 0.5 for r in recs], label="honest spread (sqrt variance)")
            ax.plot(its, [factor * r["honest_mean_norm"] for r in recs], label="copies' distance from the honest mean")
            ax.plot(its, [r["honest_mean_norm"] for r in recs], "k--", lw=1, label="honest mean's norm")
            ax.plot(its, [r["aggregate_distance"] for r in recs], label="aggregate's distance from the honest mean")
            ax.set_yscale("log")
            accuracy = run.final_accuracy
            ax.set_title(f"{run.label}, {attack}" + (f": {accuracy:.3f}" if accuracy is not None else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel("distance")
            if i == len(attacks) - 1:
                ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    handles, labels = next(a for row in axes for a in row if a.lines).get_legend_handles_labels()
    ncol = 4 if len(columns) > 2 else 2 if len(columns) == 2 else 1  # a narrow figure: the legend in rows
    rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, min(0.5, (0.1 + 0.22 * rows) / (3.0 * len(attacks))), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    lines = [
        "Medians over the last third of the iterations: the honest messages' spread (sqrt of their variance), "
        "the honest mean's norm |m|, their ratio, and the aggregate's distance from the honest mean over |m|.",
        "",
        r"| run | attack | spread | \|m\| | \|m\| / spread | \|a - m\| / \|m\| | final accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = [r for r in runs if r.column in columns and (r in chosen or r.config["attack"] == "none")]
    for run in sorted(shown, key=_by_column_then_attack):
        spread = _late_median(run, lambda r: max(r["honest_variance"], 0.0) ** 0.5)
        norm = _late_median(run, lambda r: r["honest_mean_norm"])
        ratio = _late_median(run, lambda r: r["aggregate_distance"] / r["honest_mean_norm"])
        acc = run.final_accuracy
        lines.append(
            f"| {run.label} | {run.config['attack']} | {spread:.3g} | {norm:.3g} | {norm / spread:.2f} | "
            f"{ratio:.2f} | {'-' if acc is None else f'{acc:.4f}'} |"
        )
    return "\n".join(lines) + "\n"


def convex(runs: list[Run]) -> str | None:
    """Markdown for convex runs (those recording the optimality gap; Figs. 3-6): per run, the final
    gap F(x) - F(x*), the gap at the middle evaluation (is it still falling?), the final test accuracy
    and the geometric mean of the honest messages' variance over the second half of the iterations
    (each evaluation's interval mean). None when no run records the gap."""
    chosen = [r for r in runs if any(x.get("optimality_gap") is not None for x in r.records)]
    if not chosen:
        return None
    lines = [
        "Optimality gap F(x) - F(x*) at the middle and the last evaluation, final test accuracy, and the honest "
        "messages' variance (geometric mean of the interval means over the second half of the iterations).",
        "",
        "| run | attack | gap, middle | gap, last | final accuracy | honest variance, 2nd half |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted(chosen, key=_by_column_then_attack):
        gaps = [(x["iteration"], x["optimality_gap"]) for x in run.records if x.get("optimality_gap") is not None]
        last = gaps[-1][0]
        middle = min(gaps, key=lambda g: abs(g[0] - last / 2))[1]
        late = [
            x["honest_variance_interval_mean"]
            for x in run.records
            if x["iteration"] > last / 2 and (x.get("honest_variance_interval_mean") or 0.0) > 0.0
        ]
        variance = math.exp(sum(math.log(v) for v in late) / len(late)) if late else float("nan")
        acc = run.final_accuracy
        lines.append(
            f"| {run.label} | {run.config['attack']} | {middle:.3g} | {gaps[-1][1]:.3g} | "
            f"{'-' if acc is None else f'{acc:.4f}'} | {variance:.3g} |"
        )
    return "\n".join(lines) + "\n"


def write_report(dirs: list[Path], out: Path | None = None) -> dict[str, Path]:
    """Write table.md, table.csv, figure.png and, when the runs cover cells of the paper's Table I,
    paper.md (``beside_paper``), when rules met two attacks or more, worst.md and heatmap.png, and
    when robust rules met sign-flip or zero-gradient, mechanism.png and mechanism.md, for convex runs
    convex.md, into ``out`` (default: the first folder)."""
    runs = collect(dirs)
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    attacks, columns, cells = table(runs)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv", "figure": out / "figure.png"}
    paths["markdown"].write_text(markdown(attacks, columns, cells))
    paths["csv"].write_text(csv_text(attacks, columns, cells))
    figure(runs, paths["figure"])
    compared = beside_paper(runs)
    if compared is not None:
        paths["paper"] = out / "paper.md"
        paths["paper"].write_text(compared)
    worst = worst_case(runs)
    if worst is not None:  # a rules x attacks grid: the worst case per rule and the heatmap
        paths["worst"] = out / "worst.md"
        paths["worst"].write_text(worst)
        paths["heatmap"] = out / "heatmap.png"
        heatmap(runs, paths["heatmap"])
    held = mechanism(runs, out / "mechanism.png")  # identical-copy attacks against robust rules
    if held is not None:
        paths["mechanism"] = out / "mechanism.png"
        paths["mechanism-table"] = out / "mechanism.md"
        paths["mechanism-table"].write_text(held)
    gaps = convex(runs)
    if gaps is not None:
        paths["convex"] = out / "convex.md"
        paths["convex"].write_text(gaps)
    detected = detection(runs)
    if detected is not None:
        paths["detection"] = out / "detection.md"
        paths["detection"].write_text(detected)
    return paths
