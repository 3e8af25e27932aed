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
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from strategies import kernels


@dataclass
class Aggregate:
    """The aggregated (d,) vector and the rule's diagnostics (numbers only)."""

    vector: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)


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
        return Aggregate(kernels.safe_mean(messages))

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
        return Aggregate(kernels.combine(messages, alpha, gram), info)


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

    def coefficients(self, gram: kernels.Gram) -> tuple[np.ndarray, dict[str, float]]:
        alpha, iterations, step = kernels.weiszfeld(gram, self.tol, self.max_iter, self.eps)
        return alpha, {"iterations": iterations, "converged": float(step <= self.tol), "last_step": step}


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
        _, info = self.coefficients(kernels.centered_gram(messages))
        return Aggregate(messages[int(info["selected"])].clone(), info)  # exactly the chosen input


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


class TrimmedMean(Rule):
    """Coordinate-wise trimmed mean: drop the f largest and f smallest values, average the rest."""

    name = "trimmed-mean"
    breakdown = 0.5

    def __init__(self, f: int) -> None:
        self.f = _check_int("trimmed-mean f (values dropped at each end)", f, 0)

    def min_messages(self) -> int:
        return 2 * self.f + 1

    def requirement(self) -> str:
        return f"n > 2f with f = {self.f}"

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
        beta = len(selected) - 2 * f
        theta = len(selected)
        median = kernels.order_statistic_mean(chosen, (theta - 1) // 2, theta // 2 + 1)
        gap = chosen - median
        if not bool(torch.isfinite(gap).all()):  # near the dtype's limit: measure in float64
            gap = chosen.double() - median.double()
        closest = torch.topk(gap.abs(), beta, dim=0, largest=False).indices
        return Aggregate(kernels.safe_mean(torch.gather(chosen, 0, closest)), {"selected_count": theta})


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
        return Aggregate(v, {"clipped": clipped})


class NNM(Rule):
    """Nearest-neighbour mixing (Allouah et al. 2023) in front of another rule.

    Each message is replaced by the average of its n - f nearest messages (itself included),
    then ``rule`` aggregates the mixed messages.
    """

    def __init__(self, rule: Rule, f: int) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"nnm needs a rule to feed, got {type(rule).__name__}")
        self.rule = rule
        self.f = _check_int("nnm f (assumed Byzantine messages)", f, 0)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nnm+{self.rule.name}"

    @property
    def breakdown(self) -> float | None:  # type: ignore[override]
        return self.rule.breakdown

    def min_messages(self) -> int:
        return max(self.f + 1, self.rule.min_messages())

    def requirement(self) -> str:
        return f"n > f with f = {self.f}, and {self.rule.requirement()}"

    def reset(self) -> None:
        self.rule.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.rule.state_dict()  # NNM itself keeps nothing between calls

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rule.load_state_dict(state)

    def tolerance_problem(self, n: int, byzantine: int) -> str | None:
        if byzantine > self.f:
            return f"nnm assumes f = {self.f} Byzantine messages but {byzantine} of {n} are Byzantine"
        return self.rule.tolerance_problem(n, byzantine)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        gram = kernels.centered_gram(messages)
        mix = kernels.nearest_neighbour_weights(kernels.squared_distances(gram), self.f)
        if hasattr(self.rule, "coefficients"):
            # The mixed messages A m have Gram matrix A G A^T (rows of A sum to 1, so the centre
            # carries over): no n x d product is formed, only the final combination.
            mixed = dataclasses.replace(gram, matrix=mix @ gram.matrix @ mix.T)
            self.rule.check(messages)
            alpha, info = self.rule.coefficients(mixed)
            return Aggregate(kernels.combine(messages, mix.T.numpy() @ alpha, gram), info)
        if gram.wide:  # averages of values near the dtype's limit: mix in float64
            return self.rule((mix.to(messages.device) @ messages.to(torch.float64)).to(messages.dtype))
        return self.rule(mix.to(messages.dtype).to(messages.device) @ messages)


def finite_rows(messages: torch.Tensor) -> torch.Tensor:
    """(n,) bool: rows without NaN or Inf (the others must be dropped before aggregating).

    A row's sum is finite when all its entries are, unless finite entries overflow it: only rows
    whose sum is not finite are checked entry by entry (one pass instead of four). On a GPU the
    sum is taken in float64, which no float32 row can overflow: exact, with no host round-trip."""
    if not kernels.reads_are_free(messages) and messages.dtype != torch.float64:
        return torch.isfinite(messages.sum(dim=1, dtype=torch.float64))
    ok = torch.isfinite(messages.sum(dim=1))
    for i in (~ok).nonzero().reshape(-1).tolist():
        ok[i] = bool(torch.isfinite(messages[i]).all())
    return ok


RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (Mean, GeometricMedian, Krum, MultiKrum, Median, TrimmedMean, Bulyan, CenteredClipping)
}
#: what may stand in front of any rule; NNM(rule, f)
PRE_AGGREGATORS: dict[str, type[Rule] | None] = {"none": None, "nnm": NNM}


def takes_f(cls: type) -> bool:
    """Whether the class's constructor takes ``f``, the number of Byzantine messages assumed."""
    return "f" in inspect.signature(cls).parameters


def make_rule(name: str, *, f: int = 0, pre: str = "none", **params) -> Rule:
    """The rule ``name`` (built with ``params``; ``f`` where the rule takes it), optionally
    behind the ``pre`` pre-aggregator ('none' or 'nnm')."""
    if name not in RULES:
        raise ValueError(f"aggregator={name!r} is not available; choose one of: {', '.join(RULES)}")
    if pre not in PRE_AGGREGATORS:
        raise ValueError(f"pre-aggregator={pre!r} is not valid; choose one of: {', '.join(PRE_AGGREGATORS)}")
    cls = RULES[name]
    return behind(pre, cls(f=f, **params) if takes_f(cls) else cls(**params), f)


def behind(pre: str, rule: Rule, f: int) -> Rule:
    """``rule`` behind the pre-aggregator ``pre`` ('none': the rule itself)."""
    wrapper = PRE_AGGREGATORS[pre]
    return wrapper(rule, f) if wrapper is not None else rule
