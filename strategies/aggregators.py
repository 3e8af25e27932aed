"""Aggregation rules: pure torch on an (n, d) tensor of messages, returning a (d,) tensor.

Each rule is a small callable object: parameters are validated when it is built, and a call
returns an ``Aggregate`` holding the vector and the rule's diagnostics (iterations used, the
selected row, ...). No Flower import here: the rules are usable and tested alone. Pairwise
quantities come from one n x n Gram matrix (``kernels.centered_gram``); coordinate-wise rules
select order statistics column by column, vectorised.

The registry: ``RULES`` maps each rule's ``name`` to its class. A rule's ``options`` maps
run-config keys to its constructor's arguments as ``{key: (argument, meaning, constraints)}``
(constraints: ``choices``, ``minimum``, ``maximum``, ``positive``); the default is the
constructor's, written once. ``f`` (the Byzantine messages assumed) comes from the run. Adding a
rule is one class here, added to ``RULES``, and a test: the run config, its validation, the
README's key table and ``pyproject.toml`` derive from the registry (``byzflower config --sync``).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from strategies import kernels


@dataclass
class Aggregate:
    """The aggregated (d,) vector, the rule's diagnostics (numbers only) and, where the rule
    computes it anyway, each input row's share of the aggregate: ``weights`` (n,) >= 0 summing to 1
    (Weiszfeld's coefficients, Krum's selection, the rows a filter kept, clipping's factors). None
    for coordinate-wise rules, whose rows count per coordinate. Detection (the recorder's
    suspicion scores) reads it; the rule never learns who is Byzantine."""

    vector: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)
    weights: np.ndarray | None = None


def distrust_of(shares: np.ndarray) -> np.ndarray:
    """(n,) each aggregated row's distrust from its share of the aggregate (``Aggregate.weights``):
    1 - share x n, floored at 0; 0 when the rule trusted the row at least as much as an average one,
    1 when it left the row out."""
    w = np.asarray(shares, dtype=np.float64)
    return np.maximum(0.0, 1.0 - len(w) * w)


def _shares(weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """Non-negative weights scaled to sum 1 (float64 numpy)."""
    w = np.clip(np.asarray(weights.cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64), 0, None)
    total = w.sum()
    return w / total if total > 0 else np.full(len(w), 1.0 / max(len(w), 1))


def _kept(n: int, rows: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
    """Equal shares on ``rows``, none elsewhere."""
    w = np.zeros(n)
    w[np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)] = 1.0
    return _shares(w)


class AggregationError(ValueError):
    """The messages cannot be aggregated by this rule (too few, wrong shape or dtype)."""


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


#: the registry's option format: run-config key -> (constructor argument, meaning, constraints)
Options = dict[str, tuple[str, str, dict]]


class Rule:
    """Base class of aggregation rules."""

    name = "rule"
    options: ClassVar[Options] = {}
    #: fraction of Byzantine messages the rule tolerates in theory (None: not defined)
    breakdown: float | None = None
    #: whether the rule must be told which worker each row came from (``label_rows``): MoNNA's pivot
    needs_workers: ClassVar[bool] = False

    def label_rows(self, workers: list[int] | None) -> None:
        """The worker id of each row of the next call (None: not known); only rules that
        ``needs_workers`` use it. Engines assign workers, so ids are the server's, never a node's claim."""

    def workers_problem(self, num_workers: int) -> str | None:
        """Why the rule cannot run with workers 0..num_workers - 1 (None if it can)."""
        return None

    def trusted_workers(self) -> list[int]:
        """The workers whose messages the rule takes on trust (MoNNA's pivot); none for most rules."""
        return []

    def min_messages(self) -> int:
        """The fewest messages the rule accepts."""
        return 1

    def requirement(self) -> str:
        """The rule's condition on n, in words (for error messages)."""
        return f"n >= {self.min_messages()}"

    def check(self, messages: torch.Tensor) -> None:
        if messages.dim() != 2:
            raise AggregationError(f"{self.name}: messages must be (n, d), got shape {tuple(messages.shape)}")
        if not messages.is_floating_point():
            raise AggregationError(f"{self.name}: messages must be floating point, got {messages.dtype}")
        if messages.shape[0] < self.min_messages():
            raise AggregationError(
                f"{self.name} needs at least {self.min_messages()} messages ({self.requirement()}), "
                f"got {messages.shape[0]}"
            )

    def __call__(self, messages: torch.Tensor) -> Aggregate:
        self.check(messages)
        with kernels.host_blas_one_thread():  # the host's products are small: threads only wait
            return self.aggregate(messages)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state kept between calls (a new run)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state kept between calls (tensors), for checkpoints; empty for stateless rules."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise KeyError(f"{self.name} keeps no state, got {sorted(state)}")

    def tolerance_problem(self, n: int, byzantine: int) -> str | None:
        """Why the rule cannot tolerate ``byzantine`` of ``n`` messages in theory (None if it can)."""
        if byzantine == 0:
            return None
        f = getattr(self, "f", None)
        if f is not None and byzantine > f:
            return f"{self.name} assumes f = {f} Byzantine messages but {byzantine} of {n} are Byzantine"
        if self.breakdown == 0:
            return f"{self.name} tolerates no Byzantine message; {byzantine} of {n} are Byzantine"
        if self.breakdown is not None and byzantine >= self.breakdown * n:
            return (
                f"{self.name} tolerates fewer than {self.breakdown:.0%} Byzantine messages; "
                f"{byzantine} of {n} are Byzantine"
            )
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Mean(Rule):
    """The average of all messages (not robust: one Byzantine message moves it anywhere)."""

    name = "mean"
    breakdown = 0.0

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        return Aggregate(kernels.safe_mean(messages), weights=np.full(n, 1.0 / n))

    def weighted(self, messages: torch.Tensor, weights: np.ndarray) -> Aggregate:
        """sum_i a_i m_i / sum_i a_i (FedAvg's sample-weighted average)."""
        self.check(messages)
        a = _shares(weights)
        return Aggregate(kernels.combine(messages, a, kernels.centered_gram(messages)), weights=a)

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        n = gram.matrix.shape[0]
        return np.full(n, 1.0 / n), {}


class GramRule(Rule):
    """A rule whose result is a combination sum_i alpha_i m_i decided from the Gram matrix alone.

    Such rules compose with NNM at the cost of one Gram matrix: the mixed messages' Gram matrix
    is A G A^T for the mixing matrix A.
    """

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        """(alpha (n,), diagnostics)."""
        raise NotImplementedError

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        gram = kernels.centered_gram(messages)
        alpha, info = self.coefficients(gram)
        return Aggregate(kernels.combine(messages, alpha, gram), info, _shares(alpha))


class GeometricMedian(GramRule):
    """argmin_z sum_i ||m_i - z||, by Weiszfeld iterations started at the mean.

    Every Weiszfeld iterate is a convex combination of the messages, so the iterations run on n
    coefficients against one n x n Gram matrix (centred at a robustly chosen message, and
    solved in float64): the cost is one Gram matrix plus one pass, whatever the number of
    iterations. Stops when an iterate moves by at most ``tol`` times the data's scale (the
    median distance of the messages from their medoid; the paper's 1e-5) or after ``max_iter``
    iterations: scale-free, so the same tolerance means the same accuracy for messages of any
    size. Messages closer to the iterate than ``eps`` times that scale (or the Gram matrix's
    numerical resolution) count as reached and are handled as Vardi and Zhang (2000) do: no
    division by zero, and no arbitrary finite weight that would bias the result.
    """

    name = "gm"
    breakdown = 0.5
    options: ClassVar[Options] = {
        "gm-tol": (
            "tol",
            "stop when a Weiszfeld step moves less than this times the data's scale (the median distance from "
            "the medoid to the messages; the paper's 1e-5).",
            {"positive": True, "maximum": 1.0},
        ),
        "gm-max-iter": ("max_iter", "at most this many Weiszfeld iterations.", {"positive": True}),
        "gm-eps": (
            "eps",
            "messages closer to the iterate than this times the data's scale count as on it.",
            {"positive": True, "maximum": 1.0},
        ),
    }

    def __init__(self, tol: float = 1e-5, max_iter: int = 80, eps: float = 1e-8) -> None:
        self.tol = _check_positive("gm tol", tol)
        self.max_iter = _check_int("gm max_iter", max_iter, 1)
        self.eps = _check_positive("gm eps", eps)

    def coefficients(
        self, gram: kernels.Gram, point_weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        alpha, iterations, step = kernels.weiszfeld(gram, self.tol, self.max_iter, self.eps, point_weights)
        return alpha, {"iterations": iterations, "converged": float(step <= self.tol), "last_step": step}

    def weighted(self, messages: torch.Tensor, weights: np.ndarray) -> Aggregate:
        """argmin_z sum_i a_i ||m_i - z||: the weighted geometric median (RFA, Pillutla et al. 2022)."""
        self.check(messages)
        gram = kernels.centered_gram(messages)
        alpha, info = self.coefficients(gram, np.asarray(weights, dtype=np.float64))
        return Aggregate(kernels.combine(messages, alpha, gram), info, _shares(alpha))


class Krum(GramRule):
    """Krum (Blanchard et al. 2017): the message whose n - f - 2 nearest others are closest.

    score_i = sum of the squared distances from m_i to its n - f - 2 nearest other messages;
    returns the message with the smallest score. Requires n > 2f + 2.
    """

    name = "krum"

    def __init__(self, f: int) -> None:
        self.f = _check_int("krum f (assumed Byzantine messages)", f, 0)

    def min_messages(self) -> int:
        return 2 * self.f + 3

    def requirement(self) -> str:
        return f"n > 2f + 2 with f = {self.f}"

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        scores = kernels.krum_scores(kernels.squared_distances(gram), self.f)
        best = int(torch.argmin(scores))
        alpha = np.zeros(gram.matrix.shape[0])
        alpha[best] = 1.0
        return alpha, {"selected": best, "score": float(scores[best]) * gram.scale**2}

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        alpha, info = self.coefficients(kernels.centered_gram(messages))
        return Aggregate(messages[int(info["selected"])].clone(), info, alpha)  # exactly the chosen input


class MultiKrum(Krum):
    """Multi-Krum: the average of the m messages with the best Krum scores (m = n - f by default)."""

    name = "multi-krum"
    options: ClassVar[Options] = {
        "krum-m": ("m", "how many best-scored messages to average; 0 = n - f.", {"minimum": 0})
    }

    def __init__(self, f: int, m: int = 0) -> None:
        super().__init__(f)
        self.m = _check_int("multi-krum m", m, 0) or None

    def min_messages(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        n = gram.matrix.shape[0]
        m = self.m or n - self.f
        scores = kernels.krum_scores(kernels.squared_distances(gram), self.f)
        chosen = torch.topk(scores, m, largest=False).indices.numpy()
        alpha = np.zeros(n)
        alpha[chosen] = 1.0 / m
        return alpha, {"selected_count": m, "selected": int(chosen[0])}

    aggregate = GramRule.aggregate


class Median(Rule):
    """Coordinate-wise median: the mean of the two middle values when n is even.

    ``variant='lower'`` takes the lower middle value instead (what ``torch.median`` and the
    seed notebook return), for exact comparisons with the notebook.
    """

    name = "median"
    breakdown = 0.5
    VARIANTS = ("standard", "lower")
    options: ClassVar[Options] = {
        "median-variant": (
            "variant",
            "'standard' takes the mean of the two middle values for even n, 'lower' the lower one (the notebook's).",
            {"choices": VARIANTS},
        )
    }

    def __init__(self, variant: str = "standard") -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"median variant={variant!r} is not valid; choose one of: {', '.join(self.VARIANTS)}")
        self.variant = variant

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        lo, hi = (n - 1) // 2, n // 2
        if self.variant == "lower":
            hi = lo
        return Aggregate(kernels.order_statistic_mean(messages, lo, hi + 1))


class _MajorityRule(Rule):
    """A rule assuming ``f`` Byzantine messages that needs n > 2f of them."""

    breakdown = 0.5
    f_is = "assumed Byzantine messages"  # what f means, for the error message

    def __init__(self, f: int) -> None:
        self.f = _check_int(f"{self.name} f ({self.f_is})", f, 0)

    def min_messages(self) -> int:
        return 2 * self.f + 1

    def requirement(self) -> str:
        return f"n > 2f with f = {self.f}"


class TrimmedMean(_MajorityRule):
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values, average the rest."""

    name = "trimmed-mean"
    f_is = "values dropped at each end"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        return Aggregate(kernels.order_statistic_mean(messages, self.f, n - self.f))


class Bulyan(Rule):
    """Bulyan (El Mhamdi et al. 2018) over Krum: requires n >= 4f + 3.

    Selection: theta = n - 2f messages, picked one at a time by Krum among those not yet picked.
    Aggregation: per coordinate, the average of the beta = theta - 2f selected values closest to
    the selection's coordinate-wise median.
    """

    name = "bulyan"

    def __init__(self, f: int) -> None:
        self.f = _check_int("bulyan f (assumed Byzantine messages)", f, 0)

    def min_messages(self) -> int:
        return 4 * self.f + 3

    def requirement(self) -> str:
        return f"n >= 4f + 3 with f = {self.f}"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n, f = messages.shape[0], self.f
        dist = kernels.squared_distances(kernels.centered_gram(messages))
        selected = kernels.iterated_krum(dist, f, n - 2 * f)
        chosen = messages[selected]
        theta = len(selected)
        mean = kernels.closest_to_median_mean(chosen, theta - 2 * f)
        return Aggregate(mean, {"selected_count": theta}, _kept(n, selected))


class CenteredClipping(Rule):
    """Centred clipping (Karimireddy, He, Jaggi 2021).

    v <- v + (1/n) sum_i (m_i - v) * min(1, tau / ||m_i - v||), ``iterations`` times, from
    ``init``: 'previous' (the last aggregate, as in the paper; zero at the first call),
    'median' (coordinate-wise), 'mean' or 'zero'. The rule keeps the last aggregate as state.
    """

    name = "centered-clipping"
    INITS = ("previous", "median", "mean", "zero")
    options: ClassVar[Options] = {
        "cc-tau": ("tau", "clipping radius tau.", {"positive": True}),
        "cc-iters": ("iterations", "clipping iterations per aggregation.", {"positive": True}),
        "cc-init": ("init", "start point (previous aggregate, median, mean, zero).", {"choices": INITS}),
    }

    def __init__(self, tau: float = 10.0, iterations: int = 3, init: str = "previous") -> None:
        self.tau = _check_positive("centered-clipping tau", tau)
        self.iterations = _check_int("centered-clipping iterations", iterations, 1)
        if init not in self.INITS:
            raise ValueError(f"centered-clipping init={init!r} is not valid; choose one of: {', '.join(self.INITS)}")
        self.init = init
        self._previous: torch.Tensor | None = None

    def reset(self) -> None:
        self._previous = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._previous is None else {"previous": self._previous.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = set(state) - {"previous"}
        if unknown:
            raise KeyError(f"centered-clipping state has unknown entries {sorted(unknown)}")
        self._previous = state["previous"].clone() if "previous" in state else None

    def _start(self, messages: torch.Tensor) -> torch.Tensor:
        d = messages.shape[1]
        if self.init == "previous" and self._previous is not None and self._previous.shape == (d,):
            return self._previous.to(messages)
        if self.init == "median":
            n = messages.shape[0]
            return kernels.order_statistic_mean(messages, (n - 1) // 2, n // 2 + 1)
        if self.init == "mean":
            return messages.mean(dim=0)
        return torch.zeros(d, dtype=messages.dtype, device=messages.device)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        # v stays an affine combination gamma * v0 + sum_i beta_i m_i, so every iteration runs on
        # n + 1 coefficients against the Gram matrix extended by v0.
        v0 = self._start(messages)
        gram = kernels.centered_gram(messages)
        g = gram.matrix.numpy()
        # <m_i - c, v0 - c> and ||v0 - c||^2, in the Gram matrix's units (divided by scale^2)
        wide = messages.to(torch.float64) if gram.wide else messages
        c = wide[gram.center] if gram.center >= 0 else torch.zeros_like(wide[0])
        y = (v0.to(wide.dtype) - c) / gram.scale
        xy = ((wide @ y) - (c @ y)).to(torch.float64).cpu().numpy() / gram.scale
        yy = float(y.double() @ y.double())
        n = g.shape[0]
        gamma, beta = 1.0, np.zeros(n)
        diag = np.diag(g)
        tau = self.tau / gram.scale
        clipped = 0
        for _ in range(self.iterations):
            gb = g @ beta
            vv = gamma * gamma * yy + 2.0 * gamma * (beta @ xy) + beta @ gb
            norms = np.sqrt(np.maximum(diag - 2.0 * (gamma * xy + gb) + vv, 0.0))
            scale = tau / np.maximum(norms, tau)  # min(1, tau / ||m_i - v||), also when m_i == v
            clipped = int((scale < 1).sum())
            keep = 1.0 - scale.sum() / n
            gamma, beta = gamma * keep, beta * keep + scale / n
        v = gamma * v0 + kernels.combine(messages, beta, gram)
        self._previous = v.detach().clone()
        return Aggregate(v, {"clipped": clipped}, _shares(beta))


class Meamed(_MajorityRule):
    """Mean around the median (Xie, Koyejo and Gupta, "Generalized Byzantine-tolerant SGD", 2018):
    per coordinate, the mean of the n - f values closest to the coordinate-wise median."""

    name = "meamed"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        return Aggregate(kernels.closest_to_median_mean(messages, messages.shape[0] - self.f))


class CGE(_MajorityRule):
    """Comparative gradient elimination (Gupta, Liu and Vaidya, "Byzantine fault-tolerant
    distributed machine learning with norm-based comparative gradient elimination", DSN-W 2021):
    the n - f messages of smallest norm, averaged (the paper sums them; the average keeps the step
    size comparable with the other rules). Norms are taken in float64, so no norm overflows."""

    name = "cge"

    def min_messages(self) -> int:
        return self.f + 1

    def requirement(self) -> str:
        return f"n > f with f = {self.f}"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        norms = torch.linalg.vector_norm(messages, dim=1, dtype=torch.float64)
        keep = torch.topk(norms, messages.shape[0] - self.f, largest=False).indices
        shares = _kept(messages.shape[0], keep)
        return Aggregate(_weighted_sum(messages, shares), {"largest_kept_norm": float(norms[keep].max())}, shares)


class _SubsetRule(_MajorityRule, GramRule):
    """The mean of the n - f messages whose subset scores lowest, found exactly: every one of the
    C(n, f) subsets is scored from the Gram matrix, in blocks, so the cost grows like n^f. More
    than ``max_subsets`` are refused before any work (and before the run, by the config check).
    Measured on 2 cores (``benchmarks/aggregators.py``): MDA at n = 20, f = 5 (15,504 subsets)
    41 ms including the Gram matrix of d = 39,760; 1.8e5 subsets about 0.5 s; the paper's n = 70,
    f = 20 (1.6e17 subsets) is out of reach for any exact method of this kind."""

    options: ClassVar[Options] = {
        "max-subsets": (
            "max_subsets",
            "the most subsets an exact subset rule may score (C(n, f)); more are refused before the run.",
            {"positive": True},
        )
    }

    def __init__(self, f: int, max_subsets: int = 200_000) -> None:
        super().__init__(f)
        self.max_subsets = _check_int(f"{self.name} max_subsets", max_subsets, 1)

    def requirement(self) -> str:
        return f"{super().requirement()} and C(n, f) <= {self.max_subsets:,} subsets"

    def check(self, messages: torch.Tensor) -> None:
        super().check(messages)
        subsets = math.comb(messages.shape[0], self.f)
        if subsets > self.max_subsets:
            raise AggregationError(
                f"{self.name}: n = {messages.shape[0]}, f = {self.f} means C(n, f) = {subsets:.3g} subsets to "
                f"score, more than max-subsets = {self.max_subsets:,}; use fewer workers, a smaller f or "
                "another rule"
            )

    def _scores(self, kept: np.ndarray, g: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """(c,) the score of each of c subsets, given as (c, n - f) member indices."""
        raise NotImplementedError

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        g, d2 = gram.host()[:2]
        n = g.shape[0]
        best, best_kept = math.inf, None
        subsets = itertools.combinations(range(n), n - self.f)
        while block := list(itertools.islice(subsets, 4096)):
            kept = np.array(block, dtype=np.int64).reshape(len(block), n - self.f)
            scores = self._scores(kept, g, d2)
            i = int(np.argmin(scores))  # the first of equal scores, in lexicographic order
            if scores[i] < best:
                best, best_kept = float(scores[i]), kept[i]
        alpha = np.zeros(n)
        alpha[best_kept] = 1.0 / (n - self.f)
        return alpha, {self.score_name: self._in_units(best, gram.scale)}


class MDA(_SubsetRule):
    """Minimum diameter averaging (El Mhamdi, Guerraoui and Rouault, "The hidden vulnerability of
    distributed learning in Byzantium", ICML 2018): the mean of the n - f messages whose largest
    pairwise distance is smallest. Exact, see ``_SubsetRule``."""

    name = "mda"
    score_name = "diameter"

    def _scores(self, kept, g, d2):
        sub = d2[kept[:, :, None], kept[:, None, :]]  # (c, k, k) squared distances within each subset
        return sub.max(axis=(1, 2))

    @staticmethod
    def _in_units(score: float, scale: float) -> float:
        return math.sqrt(score) * scale


class SMEA(_SubsetRule):
    """Smallest maximum eigenvalue averaging (Allouah et al., "Fixing by mixing: a recipe for optimal
    Byzantine ML under heterogeneity", AISTATS 2023): the mean of the n - f messages whose empirical
    covariance has the smallest largest eigenvalue. Exact, see ``_SubsetRule``."""

    name = "smea"
    score_name = "max_eigenvalue"

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        # The covariance's nonzero eigenvalues are those of J G_S J / k (J centres the subset S);
        # its trace bounds the largest from below (at most k - 1 are nonzero). Subsets are
        # decomposed in increasing order of that bound until it reaches the best so far.
        g = gram.host()[0]
        n = g.shape[0]
        k = n - self.f
        kept = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
        diag_sums = np.diag(g)[kept].sum(axis=1)
        totals = np.concatenate(
            [g[b[:, :, None], b[:, None, :]].sum(axis=(1, 2)) for b in np.array_split(kept, max(1, len(kept) // 4096))]
        )
        lower = (diag_sums - totals / k) / k / max(k - 1, 1)
        order = np.argsort(lower, kind="stable")
        centre = np.eye(k) - 1.0 / k
        best, best_i = math.inf, -1
        for start in range(0, len(order), 256):
            chunk = order[start : start + 256]
            if lower[chunk[0]] > best:
                break
            sub = g[kept[chunk][:, :, None], kept[chunk][:, None, :]]
            scores = np.linalg.eigvalsh(centre @ sub @ centre / k)[:, -1]
            for score, index in zip(scores.tolist(), chunk.tolist(), strict=True):
                if score < best or (score == best and index < best_i):  # ties: the first subset in order
                    best, best_i = score, index
        alpha = np.zeros(n)
        alpha[kept[best_i]] = 1.0 / k
        return alpha, {self.score_name: self._in_units(best, gram.scale)}

    @staticmethod
    def _in_units(score: float, scale: float) -> float:
        return score * scale**2


class CAF(_MajorityRule, GramRule):
    """Covariance-bound agnostic filter (Allouah et al., "Towards trustworthy federated learning with
    untrusted participants", 2025, as in ByzFL): a spectral filter that needs no bound on the honest
    covariance. Weights c_i start at 1; while sum_i c_i > n - 2f, take the c-weighted mean mu_c and
    covariance Sigma_c, its top eigenpair (lambda, v), keep mu_c if lambda is the smallest seen so
    far, then shrink c_i by the factor 1 - tau_i / max tau over the rows still weighted, with
    tau_i = <m_i - mu_c, v>^2 (the row furthest along v drops out). Returns the kept mean.

    Sigma_c is never formed: its nonzero eigenvalues are those of D^1/2 G_c D^1/2 (n x n, D the
    normalised weights, G_c the Gram matrix centred at mu_c), solved exactly in float64 (the paper
    uses power iterations), so a round costs one n x n eigendecomposition whatever d is. At most n
    rounds, as each removes at least one row; with f = 0 the loop never runs and CAF is the mean."""

    name = "caf"
    score_name = "max_eigenvalue"

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        g = gram.host()[0]
        n = g.shape[0]
        c = np.ones(n)
        best, best_w, rounds = math.inf, np.full(n, 1.0 / n), 0
        while c.sum() > n - 2 * self.f:
            w = c / c.sum()
            gw = g @ w
            centred = g - gw[:, None] - gw[None, :] + w @ gw  # <m_i - mu_c, m_j - mu_c>
            root = np.sqrt(w)
            values, vectors = np.linalg.eigh(root[:, None] * centred * root[None, :])
            top = max(float(values[-1]), 0.0)
            if top < best:
                best, best_w = top, w
            rounds += 1
            if top <= gram.resolution:  # the weighted rows agree up to rounding: nothing left to filter
                break
            tau = (centred @ (root * vectors[:, -1])) ** 2 / top  # <m_i - mu_c, v>^2
            tau_max = tau[c > 0].max()
            if not tau_max > 0:
                break
            c = np.where(c > 0, c * np.clip(1.0 - tau / tau_max, 0.0, 1.0), 0.0)
        info = {"rounds": rounds} if best == math.inf else {self.score_name: best * gram.scale**2, "rounds": rounds}
        return best_w, info


class MoNNA(_MajorityRule, GramRule):
    """MoNNA (Farhadkhani et al., "Robust collaborative learning with linear gradient overhead",
    ICML 2023): the mean of the n - f messages nearest to a trusted pivot's message, the pivot's own
    included. In the paper each honest node is its own pivot; with a server, the pivot is a worker
    the operator trusts (``pivot``, a worker id: a server-side worker, a node it runs itself). The
    rule is told which worker each row came from (``label_rows``, by the engine: workers are
    assigned by the server, so this is no node's claim, and it reveals no role); a round in which
    the pivot's message is missing or was dropped fails, and says so."""

    name = "monna"
    needs_workers = True
    options: ClassVar[Options] = {
        "monna-pivot": (
            "pivot",
            "the id of the worker whose message the server trusts (the pivot).",
            {"minimum": 0},
        )
    }

    def __init__(self, f: int, pivot: int = 0) -> None:
        super().__init__(f)
        self.pivot = _check_int("monna pivot (a worker id)", pivot, 0)
        self._row: int | None = None

    def min_messages(self) -> int:
        return self.f + 1

    def requirement(self) -> str:
        return f"n > f with f = {self.f}"

    def workers_problem(self, num_workers: int) -> str | None:
        if self.pivot >= num_workers:
            return f"monna-pivot={self.pivot} is not a worker of this run; choose 0..{num_workers - 1}"
        return None

    def trusted_workers(self) -> list[int]:
        return [self.pivot]

    def label_rows(self, workers: list[int] | None) -> None:
        self._row = None if workers is None or self.pivot not in workers else list(workers).index(self.pivot)

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        row, self._row = self._row, None  # labels hold for one call
        n = gram.matrix.shape[0]
        if row is None or row >= n:
            raise AggregationError(
                f"monna: the trusted pivot's message (worker {self.pivot}) is not among the {n} rows "
                "(missing, dropped, or the engine did not say which worker each row is)"
            )
        d2 = kernels.squared_distances(gram)[row].numpy()
        others = np.arange(n) != row
        nearest = np.lexsort((np.arange(n), others, d2))[: n - self.f]  # by distance, the pivot first
        alpha = np.zeros(n)
        alpha[nearest] = 1.0 / (n - self.f)
        return alpha, {"radius": math.sqrt(float(d2[nearest].max())) * gram.scale}


class _SeededDraws:
    """For rules whose draws come from (seed, call number): reproducible, with the call counter as
    their state (``reset``, ``state_dict`` and ``load_state_dict`` like the other stateful rules)."""

    seed: int
    _calls: int = 0

    def _next_generator(self) -> torch.Generator:
        generator = torch.Generator().manual_seed(_mix(self.seed, self._calls))
        self._calls += 1
        return generator

    def reset(self) -> None:
        self._calls = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"calls": torch.tensor(self._calls)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._calls = int(state.get("calls", 0))


def _mix(seed: int, counter: int) -> int:
    """A 63-bit generator seed from (seed, counter) (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + counter + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


class ClippedClustering(Rule):
    """Clipped clustering (Li, Ngai and Voigt, "An experimental study of Byzantine-robust aggregation
    schemes in federated learning", IEEE Trans. Big Data 2023; Blades): every message is clipped to
    the median norm of the round, the clipped messages are split in two clusters by agglomerative
    clustering with average linkage on cosine distance, and the result is the mean of the larger
    cluster. (Blades clips to the median over all rounds so far; the round's median keeps the rule
    stateless.) Cosines are taken in float64 from the normalised messages."""

    name = "clipped-clustering"
    breakdown = 0.5

    def min_messages(self) -> int:
        return 2

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        norms = torch.linalg.vector_norm(messages, dim=1, dtype=torch.float64)
        limit = norms.median()
        # unit rows (a zero row stays zero: cosine 0 with every row), in the messages' dtype when every
        # 1 / norm fits it (entries <= 1: no product overflows), else in float64
        inverse = torch.where(norms > 0, 1.0 / norms, 0.0)
        narrow = inverse.to(messages.dtype)
        if bool(torch.isfinite(narrow).all()):
            unit = messages * narrow.to(messages.device)[:, None]
        else:
            unit = messages.double() * inverse.to(messages.device)[:, None]
        cosine = (unit @ unit.T).double().clamp(-1.0, 1.0).cpu().numpy()
        members = _two_clusters(1.0 - cosine)
        larger = max(members, key=lambda c: (len(c), -min(c)))  # ties: the cluster holding the lowest row
        rows = np.array(sorted(larger))
        factor = _clip_factors(norms, limit).numpy()
        weights = np.zeros(n)
        weights[rows] = factor[rows] / len(rows)  # the mean of the kept rows, each clipped
        return Aggregate(_weighted_sum(messages, weights), {"cluster_size": len(larger)}, _shares(weights))


class SignGuard(_SeededDraws, Rule):
    """SignGuard (Xu et al., "SignGuard: Byzantine-robust federated learning through collaborative
    malicious gradient filtering", ICDCS 2022): keep the messages whose norm is within
    [``lower``, ``upper``] x the median norm and which fall in the largest cluster of sign statistics
    (the fractions of positive, zero and negative entries on a random ``fraction`` of the
    coordinates, clustered by mean shift with a flat kernel and the bandwidth estimated as
    scikit-learn does at quantile 0.3); the result is the mean of the kept messages, each clipped to
    the median norm. The coordinates are drawn from (seed, call number): the call counter is state."""

    name = "signguard"
    breakdown = 0.5
    options: ClassVar[Options] = {
        "signguard-fraction": (
            "fraction",
            "signguard: the share of coordinates sampled.",
            {"positive": True, "maximum": 1.0},
        ),
    }

    def __init__(self, fraction: float = 0.1, lower: float = 0.1, upper: float = 3.0, seed: int = 0) -> None:
        self.fraction = _check_positive("signguard fraction", fraction)
        if self.fraction > 1:
            raise ValueError(f"signguard fraction must be <= 1, got {fraction}")
        self.lower = _check_positive("signguard lower", lower)
        self.upper = _check_positive("signguard upper", upper)
        self.seed = int(seed)

    def min_messages(self) -> int:
        return 2

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n, d = messages.shape
        norms = torch.linalg.vector_norm(messages, dim=1, dtype=torch.float64).cpu()
        median = norms.median()
        ratio = norms / median.clamp_min(torch.finfo(torch.float64).tiny)
        by_norm = (ratio >= self.lower) & (ratio <= self.upper)
        generator = self._next_generator()
        coords = torch.randperm(d, generator=generator)[: max(1, math.ceil(self.fraction * d))]
        sub = messages.index_select(1, coords.to(messages.device))
        stats = torch.stack([(sub > 0).double().mean(1), (sub == 0).double().mean(1), (sub < 0).double().mean(1)], 1)
        labels = _mean_shift(stats.cpu().numpy())
        largest = np.bincount(labels).argmax()
        keep = by_norm & torch.from_numpy(labels == largest)
        if not bool(keep.any()):  # no message passes both filters: the norm filter alone decides
            keep = by_norm
        rows = keep.nonzero().reshape(-1).numpy()
        factor = _clip_factors(norms, median).numpy()
        weights = np.zeros(n)
        weights[rows] = factor[rows] / len(rows)  # the mean of the kept rows, each clipped to the median norm
        return Aggregate(_weighted_sum(messages, weights), {"kept": len(rows)}, _shares(weights))


def _mean_shift(points: np.ndarray, quantile: float = 0.3, max_iter: int = 300) -> np.ndarray:
    """Cluster labels (n,) by mean shift with a flat kernel, seeded at every point; the bandwidth is
    the mean distance to the k-th nearest point, k = quantile * n (scikit-learn's estimate)."""
    n = len(points)
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    k = max(1, min(n - 1, int(n * quantile)))
    bandwidth = float(np.sort(dist, axis=1)[:, k].mean())
    if bandwidth == 0.0:  # (nearly) all points coincide: one cluster
        return np.zeros(n, dtype=np.int64)
    centres = points.copy()
    for _ in range(max_iter):
        near = np.sqrt(((centres[:, None, :] - points[None, :, :]) ** 2).sum(-1)) <= bandwidth
        moved = (near[:, :, None] * points[None]).sum(1) / near.sum(1, keepdims=True)
        done = np.abs(moved - centres).max() <= 1e-3 * bandwidth
        centres = moved
        if done:
            break
    # merge centres within a bandwidth of a more populated one, then label by the nearest centre
    population = (np.sqrt(((centres[:, None, :] - points[None, :, :]) ** 2).sum(-1)) <= bandwidth).sum(1)
    kept: list[int] = []
    for c in np.argsort(-population, kind="stable"):
        if all(np.linalg.norm(centres[c] - centres[o]) > bandwidth for o in kept):
            kept.append(int(c))
    final = centres[kept]
    return np.argmin(((points[:, None, :] - final[None, :, :]) ** 2).sum(-1), axis=1)


def _two_clusters(distance: np.ndarray) -> list[list[int]]:
    """Agglomerative clustering with average linkage (UPGMA) of n points, stopped at 2 clusters."""
    n = distance.shape[0]
    d = distance.astype(np.float64).copy()
    np.fill_diagonal(d, np.inf)
    members = [[i] for i in range(n)]
    alive = np.ones(n, dtype=bool)
    for _ in range(n - 2):
        masked = np.where(alive[:, None] & alive[None, :], d, np.inf)
        i, j = np.unravel_index(np.argmin(masked), masked.shape)
        i, j = min(i, j), max(i, j)
        a, b = len(members[i]), len(members[j])
        merged = (a * d[i] + b * d[j]) / (a + b)  # average linkage (Lance-Williams)
        d[i, :], d[:, i] = merged, merged
        d[i, i] = np.inf
        members[i] += members[j]
        alive[j] = False
    return [members[k] for k in np.flatnonzero(alive)]


class DnC(_SeededDraws, Rule):
    """Divide and conquer (Shejwalkar and Houmansadr, "Manipulating the Byzantine", NDSS 2021,
    Alg. 2): ``iterations`` times, on ``dim`` random coordinates, score each message by its squared
    projection on the top singular vector of the centred messages and drop the c * f highest; the
    result is the mean of the messages no iteration dropped. The coordinates are drawn from
    (seed, call number), so a run is reproducible and its state is the call counter. Defaults are
    ours (b = 10,000 coordinates, 5 iterations, c = 1)."""

    name = "dnc"
    breakdown = 0.5
    options: ClassVar[Options] = {
        "dnc-dim": ("dim", "coordinates sampled per iteration (all when d is smaller).", {"positive": True}),
        "dnc-iters": ("iterations", "filtering iterations.", {"positive": True}),
        "dnc-c": ("c", "filtering fraction: c * f messages dropped per iteration.", {"positive": True}),
    }

    def __init__(self, f: int, dim: int = 10_000, iterations: int = 5, c: float = 1.0, seed: int = 0) -> None:
        self.f = _check_int("dnc f (assumed Byzantine messages)", f, 0)
        self.dim = _check_int("dnc dim", dim, 1)
        self.iterations = _check_int("dnc iterations", iterations, 1)
        self.c = _check_positive("dnc c", c)
        self.seed = int(seed)

    def _dropped(self) -> int:
        return math.floor(self.c * self.f)

    def min_messages(self) -> int:
        return self._dropped() + 1

    def requirement(self) -> str:
        return f"n > c * f with c = {self.c:g}, f = {self.f}"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n, d = messages.shape
        drop = self._dropped()
        generator = self._next_generator()
        good = torch.ones(n, dtype=torch.bool)
        for _ in range(self.iterations):
            coords = torch.randperm(d, generator=generator)[: self.dim].to(messages.device)
            sub = messages.index_select(1, coords).double()
            sub = sub - sub.mean(dim=0)
            scale = float(sub.abs().max()) or 1.0  # values near float64's limit stay finite squared
            gram = (sub / scale) @ (sub / scale).T
            values, vectors = torch.linalg.eigh(gram.cpu())
            # the top right singular vector v of sub: (sub . v)_i = sigma * u_i, sigma^2 = top eigenvalue
            scores = values[-1].clamp_min(0) * vectors[:, -1] ** 2
            if drop:
                good[torch.topk(scores, drop).indices] = False
        shares = _kept(n, good.nonzero().reshape(-1))
        return Aggregate(_weighted_sum(messages, shares), {"kept": int(good.sum())}, shares)


class PreAggregator(Rule):
    """Base class of what stands in front of a rule: it transforms the (n, d) messages (mixing,
    bucketing, clipping) and hands the result to ``rule``. Name, state and tolerance are the rule's,
    prefixed by the pre-aggregator's name."""

    label = "pre"

    def __init__(self, rule: Rule) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"{self.label} needs a rule to feed, got {type(rule).__name__}")
        self.rule = rule

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.label}+{self.rule.name}"

    @property
    def breakdown(self) -> float | None:  # type: ignore[override]
        return self.rule.breakdown

    def min_messages(self) -> int:
        return self.rule.min_messages()

    def requirement(self) -> str:
        return self.rule.requirement()

    def rows_out(self, n: int) -> int:
        """How many rows the rule behind receives from n messages."""
        return n

    @property
    def needs_workers(self) -> bool:  # type: ignore[override]
        return self.rule.needs_workers

    def label_rows(self, workers: list[int] | None) -> None:
        self.rule.label_rows(workers)  # row i still stands for worker i (mixed, or scaled)

    def workers_problem(self, num_workers: int) -> str | None:
        return self.rule.workers_problem(num_workers)

    def trusted_workers(self) -> list[int]:
        return self.rule.trusted_workers()

    def check(self, messages: torch.Tensor) -> None:
        """The messages', then the rule's refusals for the rows it will receive (e.g. MDA's cost)."""
        super().check(messages)
        self.rule.check(messages[: self.rows_out(messages.shape[0])])

    def reset(self) -> None:
        self.rule.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rule.load_state_dict(state)

    def tolerance_problem(self, n: int, byzantine: int) -> str | None:
        return self.rule.tolerance_problem(n, byzantine)


class NNM(PreAggregator):
    """Nearest-neighbour mixing (Allouah et al. 2023) in front of another rule.

    Each message is replaced by the average of its n - f nearest messages (itself included),
    then ``rule`` aggregates the mixed messages.
    """

    label = "nnm"

    def __init__(self, rule: Rule, f: int) -> None:
        super().__init__(rule)
        self.f = _check_int("nnm f (assumed Byzantine messages)", f, 0)

    def min_messages(self) -> int:
        return max(self.f + 1, self.rule.min_messages())

    def requirement(self) -> str:
        return f"n > f with f = {self.f}, and {self.rule.requirement()}"

    def tolerance_problem(self, n: int, byzantine: int) -> str | None:
        if byzantine > self.f:
            return f"nnm assumes f = {self.f} Byzantine messages but {byzantine} of {n} are Byzantine"
        return self.rule.tolerance_problem(n, byzantine)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        gram = kernels.centered_gram(messages)
        mix = kernels.nearest_neighbour_weights(kernels.squared_distances(gram), self.f)
        return _mixed(self.rule, messages, mix, gram)


class Bucketing(_SeededDraws, PreAggregator):
    """Bucketing (Karimireddy, He and Jaggi, "Byzantine-robust learning on heterogeneous datasets
    via bucketing", ICLR 2022): the messages are shuffled, split into ceil(n / s) buckets of s
    (the last one smaller when s does not divide n), and ``rule`` aggregates the buckets' means.
    The shuffle is drawn from (seed, call number): reproducible, and the call counter is state."""

    label = "bucketing"
    options: ClassVar[Options] = {"bucket-size": ("s", "bucketing: messages per bucket s.", {"positive": True})}

    def __init__(self, rule: Rule, s: int = 2, seed: int = 0) -> None:
        super().__init__(rule)
        if rule.needs_workers:
            raise ValueError(
                f"bucketing cannot stand in front of {rule.name}: a bucket mixes several workers, so no row "
                "stands for the worker the rule must find; use it without bucketing"
            )
        self.s = _check_int("bucketing s (messages per bucket)", s, 1)
        self.seed = int(seed)

    def min_messages(self) -> int:
        return self.s * (self.rule.min_messages() - 1) + 1  # ceil(n / s) buckets for the rule

    def rows_out(self, n: int) -> int:
        return -(-n // self.s)

    def requirement(self) -> str:
        return f"ceil(n / s) buckets with s = {self.s}, and for the buckets {self.rule.requirement()}"

    def tolerance_problem(self, n: int, byzantine: int) -> str | None:
        """The rule's, for the buckets: a bucket holding one Byzantine message is one the attacker
        steers, so up to min(f, ceil(n / s)) of the buckets are (s f of n in the paper's terms)."""
        buckets = self.rows_out(n)
        tainted = min(byzantine, buckets)
        problem = self.rule.tolerance_problem(buckets, tainted)
        if problem is None:
            return None
        return (
            f"bucketing with s = {self.s} can put the {byzantine} Byzantine messages in {tainted} of its "
            f"{buckets} buckets, and for the buckets: {problem}"
        )

    def reset(self) -> None:
        _SeededDraws.reset(self)
        self.rule.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        inner = {f"rule.{k}": v for k, v in self.rule.state_dict().items()}
        return {**_SeededDraws.state_dict(self), **inner}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _SeededDraws.load_state_dict(self, state)
        self.rule.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rule.")})

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        generator = self._next_generator()
        order = torch.randperm(n, generator=generator)
        buckets = self.rows_out(n)
        member = torch.empty(n, dtype=torch.long)
        member[order] = torch.arange(n) // self.s  # message order[k] goes to bucket k // s
        mix = torch.zeros(buckets, n, dtype=torch.float64)
        mix[member, torch.arange(n)] = 1.0
        mix /= mix.sum(dim=1, keepdim=True)
        return _mixed(self.rule, messages, mix)


class Clipping(PreAggregator):
    """Static clipping: each message scaled to norm at most ``threshold`` (m * min(1, C / ||m||))
    before the rule; norms in float64, so none overflows."""

    label = "clipping"
    options: ClassVar[Options] = {
        "clip-threshold": ("threshold", "clipping: the largest norm a message keeps (C).", {"positive": True})
    }

    def __init__(self, rule: Rule, threshold: float = 1.0) -> None:
        super().__init__(rule)
        self.threshold = _check_positive("clipping threshold", threshold)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        norms = torch.linalg.vector_norm(messages, dim=1, dtype=torch.float64)
        return _through(self.rule, messages, norms, torch.full_like(norms, self.threshold))


class ARC(PreAggregator):
    """Adaptive robust clipping (Allouah et al., "Boosting robustness by clipping gradients in
    distributed learning", 2024): the k = floor(2 (f / n) (n - f)) largest messages are clipped
    to the norm of the (k + 1)-th largest, then the rule aggregates."""

    label = "arc"

    def __init__(self, rule: Rule, f: int) -> None:
        super().__init__(rule)
        self.f = _check_int("arc f (assumed Byzantine messages)", f, 0)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        n = messages.shape[0]
        k = min(math.floor(2 * (self.f / n) * (n - self.f)), n - 1)
        if k <= 0:
            return self.rule(messages)
        norms = torch.linalg.vector_norm(messages, dim=1, dtype=torch.float64)
        limit = torch.topk(norms, k + 1).values[-1]
        return _through(self.rule, messages, norms, limit.expand_as(norms))


def _clip_factors(norms: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """(n,) float64 min(1, limit / norm) per row (rows at or under their limit keep 1)."""
    return torch.where(norms > limits, limits / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


def _through(rule: Rule, messages: torch.Tensor, norms: torch.Tensor, limits: torch.Tensor) -> Aggregate:
    """``rule`` on the messages with each row scaled by min(1, limit / norm) (a factor <= 1 cannot
    overflow, so the product stays in the messages' dtype); a row's share shrinks with its factor."""
    factor = _clip_factors(norms, limits)
    if bool((factor == 1).all()):
        return rule(messages)
    out = rule(messages * factor.to(device=messages.device, dtype=messages.dtype)[:, None])
    if out.weights is not None:
        out.weights = _shares(out.weights * factor.cpu().numpy())
    return out


def _weighted_sum(messages: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """(d,) sum_i w_i m_i for weights (n,) >= 0 summing to at most 1 (finite for finite messages: in
    float64 when the dtype's sum overflows)."""
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    out = w.to(device=messages.device, dtype=messages.dtype) @ messages
    if kernels.reads_are_free(out) and kernels.all_finite(out):
        return out
    wide = (w.to(messages.device) @ messages.double()).to(messages.dtype)
    return wide if kernels.reads_are_free(out) else torch.where(torch.isfinite(out), out, wide)


def _mixed(rule: Rule, messages: torch.Tensor, mix: torch.Tensor, gram: kernels.Gram | None = None) -> Aggregate:
    """``rule`` on the rows of mix @ messages ((k, n) float64 averaging weights), formed only
    when the rule needs the rows: a Gram rule works on mix G mix^T alone."""
    gram = gram if gram is not None else kernels.centered_gram(messages)
    if hasattr(rule, "coefficients"):
        # The mixed messages A m have Gram matrix A G A^T (rows of A sum to 1, so the centre
        # carries over): no k x d product is formed, only the final combination.
        mixed = dataclasses.replace(gram, matrix=mix @ gram.matrix @ mix.T)
        alpha, info = rule.coefficients(mixed)
        combined = mix.T.numpy() @ alpha
        return Aggregate(kernels.combine(messages, combined, gram), info, _shares(combined))
    if gram.wide:  # averages of values near the dtype's limit: mix in float64
        inner = rule((mix.to(messages.device) @ messages.to(torch.float64)).to(messages.dtype))
    else:
        inner = rule(mix.to(messages.dtype).to(messages.device) @ messages)
    if inner.weights is not None:  # a mixed row's share goes to the rows it mixes
        inner.weights = _shares(mix.T.numpy() @ inner.weights)
    return inner


def finite_rows(messages: torch.Tensor) -> torch.Tensor:
    """(n,) bool: rows without NaN or Inf (the others must be dropped before aggregating).

    A row's sum is finite when all its entries are, unless finite entries overflow it: only rows
    whose sum is not finite are checked entry by entry (one pass instead of four). On a GPU the
    sum is taken in float64, which no float32 row can overflow: exact, with no host round-trip."""
    if not kernels.reads_are_free(messages) and messages.dtype != torch.float64:
        return torch.isfinite(messages.sum(dim=1, dtype=torch.float64))
    sums = messages.sum(dim=1)
    if sums.dtype in (torch.float32, torch.float64):  # numpy reads the sums in place: a third of torch's calls
        finite = np.isfinite(sums.numpy())
        ok = torch.from_numpy(finite)
        if finite.all():
            return ok
    else:
        ok = torch.isfinite(sums)
    for i in (~ok).nonzero().reshape(-1).tolist():
        ok[i] = bool(torch.isfinite(messages[i]).all())
    return ok


RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (
        Mean,
        GeometricMedian,
        Krum,
        MultiKrum,
        Median,
        TrimmedMean,
        Bulyan,
        CenteredClipping,
        Meamed,
        CGE,
        MDA,
        SMEA,
        CAF,
        MoNNA,
        DnC,
        ClippedClustering,
        SignGuard,
    )
}
#: what may stand in front of any rule; NNM(rule, f)
#: what may stand in front of any rule, by name; 'bucketing,nnm' applies bucketing, then NNM, then the rule
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {cls.label: cls for cls in (NNM, Bucketing, Clipping, ARC)}


def pre_aggregator_names(pre: str) -> list[str]:
    """'none' -> [], 'bucketing,nnm' -> ['bucketing', 'nnm'] (in the order they see the messages)."""
    names = [p.strip() for p in str(pre).split(",") if p.strip()]
    if names == ["none"]:
        return []
    bad = [p for p in names if p not in PRE_AGGREGATORS]
    if bad or not names:
        raise ValueError(
            f"pre-aggregator={pre!r} is not valid; give 'none' or a comma-separated list of: "
            f"{', '.join(PRE_AGGREGATORS)}"
        )
    return names


def takes_f(cls: type) -> bool:
    """Whether the class's constructor takes ``f``, the number of Byzantine messages assumed."""
    return "f" in inspect.signature(cls).parameters


def make_rule(name: str, *, f: int = 0, pre: str = "none", seed: int = 0, **params) -> Rule:
    """The rule ``name`` behind the pre-aggregators ``pre`` ('none', 'nnm', 'bucketing,nnm', ...),
    each component built with the ``params`` its constructor takes, ``f`` and ``seed`` where it
    takes them."""
    if name not in RULES:
        raise ValueError(f"aggregator={name!r} is not available; choose one of: {', '.join(RULES)}")
    names = pre_aggregator_names(pre)
    run = {"f": f, "seed": seed}

    def build(cls: type, **given):
        wanted = inspect.signature(cls).parameters
        return cls(**given, **{k: v for k, v in {**run, **params}.items() if k in wanted and k not in given})

    unknown = set(params) - {
        p for c in [RULES[name], *(PRE_AGGREGATORS[n] for n in names)] for p in inspect.signature(c).parameters
    }
    if unknown:
        raise TypeError(f"make_rule({name!r}): unknown parameters {sorted(unknown)}")
    rule = build(RULES[name])
    for pre_name in reversed(names):
        rule = build(PRE_AGGREGATORS[pre_name], rule=rule)
    return rule
