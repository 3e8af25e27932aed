"""Byzantine attacks: what Byzantine workers send (pure torch, no Flower).

Omniscient attacks (``omniscient = True``) see statistics of the honest messages of the same
iteration (``HonestStats``: mean, coordinate-wise standard deviation, count), never another
node's raw data. The others need no knowledge of anyone: ``noise`` sends random vectors, and
``label-flip`` is data poisoning: its workers run the honest estimator on flipped labels (the
estimator lives with the honest ones; this module provides the label map). Randomness comes from
(seed, worker id, iteration), so a worker's message does not depend on who hosts it.

The registry: ``ATTACKS`` maps each attack's ``name`` to its class; ``options`` maps run-config
keys to constructor arguments as ``{key: (argument, meaning, constraints)}``, with the default
the constructor's. The run gives ``seed``, ``num_workers`` and ``num_byzantine`` to a constructor
that takes them. Adding an attack is one class here, added to ``ATTACKS``, and a test.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist
from typing import Any, ClassVar

import torch

from clients.rng import standard_normals

F32_MAX = 3.4028234663852886e38  # messages are float32: a parameter beyond this overflows them
#: the registry's option format: run-config key -> (constructor argument, meaning, constraints)
Options = dict[str, tuple[str, str, dict]]


class HonestStats:
    """What omniscient attackers know of the honest messages of one iteration: the mean, the
    coordinate-wise standard deviation (unbiased, n - 1; computed only when asked for) and the count."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None, count: int, honest: torch.Tensor | None = None):
        self.mean = mean
        self.count = int(count)
        self._std = std
        self._honest = honest

    @classmethod
    def of(cls, honest: torch.Tensor) -> HonestStats:
        """Statistics of (n, d) honest messages."""
        n = int(honest.shape[0])
        if n == 0:
            raise ValueError("omniscient attacks need at least one honest message")
        return cls(honest.mean(dim=0), None, n, honest)

    @property
    def std(self) -> torch.Tensor:
        if self._std is None:
            assert self._honest is not None
            if self.count < 2:
                self._std = torch.zeros_like(self.mean)
            else:  # torch.std over dim 0 is ~10x slower than these three passes
                self._std = (self._honest - self.mean).pow_(2).sum(dim=0).div_(self.count - 1).sqrt_()
        return self._std

    @property
    def sum(self) -> torch.Tensor:
        return self.mean * self.count

    @property
    def messages(self) -> torch.Tensor:
        """(count, d) the honest messages themselves, in honest-worker order (for the attacks that
        declare ``needs_messages``)."""
        if self._honest is None:
            raise ValueError("this attack needs the honest messages, and only their statistics were given")
        return self._honest


class Attack:
    """Base class: ``craft`` returns the (k, d) messages of the Byzantine workers ``worker_ids``."""

    name = "attack"
    omniscient = False  # receives the honest messages' statistics of the iteration
    needs_messages = False  # ... and the honest messages themselves (HonestStats.messages)
    uses_data = False
    options: ClassVar[Options] = {}
    device = torch.device("cpu")  # where crafted messages are made (``to``)

    def to(self, device: torch.device | str) -> Attack:
        """Craft on ``device`` from now on (random draws included); returns self, like a module."""
        self.device = torch.device(device)
        return self

    def craft(self, worker_ids: list[int], iteration: int, stats: HonestStats | None, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, worker_ids: list[int], iteration: int, dim: int) -> None:
        """Start any work that does not depend on the honest messages (optional)."""

    def _need(self, stats: HonestStats | None) -> HonestStats:
        if stats is None:
            raise ValueError(f"the {self.name} attack is omniscient: it needs the honest messages' statistics")
        return stats

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def draws_inline(device: torch.device) -> bool:
    """Whether noise is drawn by kernels in the iteration's stream (a GPU: the host then never
    touches it) rather than ahead of time on a pool thread (a CPU, where that overlaps the honest
    step). The numbers are the same either way."""
    return device.type != "cpu"


class _NoiseAttack(Attack):
    """Shared by the attacks that draw N(0, std^2 I) per worker: the draws do not depend on the
    honest messages, so they can start before them (``prefetch``)."""

    options: ClassVar[Options] = {
        "attack-std": (
            "std",
            "standard deviation of the added/sent noise (the notebook's 30); at most 1e37, so that the draws "
            "stay within float32.",
            {"minimum": 0, "maximum": 1e37},
        )
    }

    def __init__(self, std: float = 30.0, seed: int = 0) -> None:
        self.std = _finite("attack-std", std)
        if self.std < 0:
            raise ValueError(f"attack-std must be >= 0, got {std}")
        self.seed = int(seed)
        self._streams: dict[tuple[int, ...], torch.Tensor] = {}

    def prefetch(self, worker_ids, iteration, dim):
        if not draws_inline(self.device):
            prefetch_noise(self.seed, self.name, worker_ids, iteration, dim)

    def _scaled_noise(self, worker_ids, iteration, dim) -> torch.Tensor:
        """(k, d) std * N(0, I) on the attack's device, worker w's draws from (seed, w, iteration)."""
        if not draws_inline(self.device):
            return _noise(self.seed, self.name, worker_ids, iteration, dim).mul_(self.std)
        streams = self._streams.get(tuple(worker_ids))
        if streams is None:  # built once: a tensor from a list is a host-to-device copy
            streams = torch.tensor(worker_ids, dtype=torch.int64, device=self.device)
            self._streams = {tuple(worker_ids): streams}
        return standard_normals(self.seed, streams, f"{self.name}/{iteration}", dim).mul_(self.std)


class Gaussian(_NoiseAttack):
    """The notebook's "white" attack: honest mean + std * N(0, I), a fresh draw per worker."""

    name = "gaussian"
    omniscient = True

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        return self._scaled_noise(worker_ids, iteration, dim).add_(s.mean.to(self.device))


class SignFlip(Attack):
    """scale * honest mean: -3 in the paper, -10 reproduces the notebook's "maxValue"."""

    name = "sign-flip"
    omniscient = True
    options: ClassVar[Options] = {
        "attack-scale": (
            "scale",
            "the factor on the honest mean (the paper -3; the notebook's maxValue -10).",
            {"minimum": -F32_MAX, "maximum": F32_MAX},
        )
    }

    def __init__(self, scale: float = -3.0) -> None:
        self.scale = _finite("attack-scale", scale)

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        return (self.scale * s.mean).expand(len(worker_ids), -1).clone()


class ZeroGradient(Attack):
    """Every Byzantine worker sends -sum(honest) / B, so all W messages sum to zero."""

    name = "zero-gradient"
    omniscient = True

    def __init__(self, num_byzantine: int) -> None:
        if num_byzantine < 1:
            raise ValueError(f"zero-gradient needs at least one Byzantine worker, got {num_byzantine}")
        self.num_byzantine = int(num_byzantine)

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        return (-s.sum / self.num_byzantine).expand(len(worker_ids), -1).clone()


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019: s = floor(n/2 + 1) - f workers must be won over; z = Phi^-1((n - s) / n)."""
    s = n // 2 + 1 - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"ALIE's z is undefined for n = {n}, f = {f}; give alie-z explicitly")
    return NormalDist().inv_cdf(p)


class ALIE(Attack):
    """ "A little is enough" (Baruch et al. 2019): honest mean - z * coordinate-wise std."""

    name = "alie"
    omniscient = True
    options: ClassVar[Options] = {
        "alie-z": (
            "z",
            "z in mean - z * std; 0 = from n and f as in Baruch et al. 2019.",
            {"minimum": -F32_MAX, "maximum": F32_MAX},
        )
    }

    def __init__(self, z: float = 0.0, num_workers: int = 0, num_byzantine: int = 0) -> None:
        self.z = _finite("alie-z", z) or alie_z(num_workers, num_byzantine)

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        return (s.mean - self.z * s.std).expand(len(worker_ids), -1).clone()


class IPM(Attack):
    """Inner-product manipulation (Xie et al. 2020): -epsilon * honest mean."""

    name = "ipm"
    omniscient = True
    options: ClassVar[Options] = {
        "ipm-eps": ("eps", "epsilon in -epsilon * honest mean.", {"positive": True, "maximum": F32_MAX})
    }

    def __init__(self, eps: float = 0.1) -> None:
        self.eps = _finite("ipm-eps", eps)

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        return (-self.eps * s.mean).expand(len(worker_ids), -1).clone()


class Noise(_NoiseAttack):
    """N(0, std^2 I), no knowledge of anyone."""

    name = "noise"

    def craft(self, worker_ids, iteration, stats, dim):
        return self._scaled_noise(worker_ids, iteration, dim)


class Inf(Attack):
    """+inf in every coordinate (ByzFL's "Inf" attack): what a server without screening would
    average into a non-finite model. byzflower's servers drop such rows before any rule sees them
    (counted as ``dropped_nonfinite``), so the run goes on with the honest messages alone."""

    name = "inf"

    def craft(self, worker_ids, iteration, stats, dim):
        return torch.full((len(worker_ids), dim), math.inf)


class LabelFlip(Attack):
    """Data poisoning: the honest estimator on labels y -> classes - 1 - y (no knowledge needed)."""

    name = "label-flip"
    uses_data = True

    def __init__(self, classes: int = 10) -> None:
        self.classes = int(classes)

    def flip(self, targets: torch.Tensor) -> torch.Tensor:
        return self.classes - 1 - targets

    def craft(self, worker_ids, iteration, stats, dim):
        raise TypeError("label-flip messages come from the honest estimator on flipped labels")


class Mimic(Attack):
    """Mimic (Karimireddy, He and Jaggi, ICLR 2022): every Byzantine worker sends the message of
    one honest worker, the same one every round (the ``worker``-th honest worker by id; the first
    one present when it is missing), over-weighting its data. Needs the honest messages."""

    name = "mimic"
    omniscient = True
    needs_messages = True
    options: ClassVar[Options] = {
        "mimic-worker": (
            "worker",
            "the honest worker copied, by rank among honest workers (0 = first).",
            {"minimum": 0},
        )
    }

    def __init__(self, worker: int = 0) -> None:
        if isinstance(worker, bool) or int(worker) != worker or worker < 0:
            raise ValueError(f"mimic-worker must be an integer >= 0, got {worker!r}")
        self.worker = int(worker)

    def craft(self, worker_ids, iteration, stats, dim):
        honest = self._need(stats).messages
        row = honest[self.worker] if self.worker < len(honest) else honest[0]
        return row.expand(len(worker_ids), -1).clone()


def _perturbation(kind: str, honest: torch.Tensor) -> torch.Tensor:
    """The direction p of MinMax / MinSum from the (n, d) float64 honest messages: -std (default),
    -sign(mean) or -mean / ||mean||."""
    mean = honest.mean(dim=0)
    if kind == "std":
        return -(honest.std(dim=0) if len(honest) > 1 else torch.zeros_like(mean))
    if kind == "sign":
        return -torch.sign(mean)
    return -mean / torch.linalg.vector_norm(mean).clamp_min(1e-300)


class _Shejwalkar(Attack):
    """MinMax and MinSum (Shejwalkar and Houmansadr, "Manipulating the Byzantine", NDSS 2021):
    m = mean + gamma * p with the largest gamma that keeps m as close to the honest messages as
    they are to each other. The paper finds gamma by bisection; here it is solved exactly: with
    a_i = ||mean - g_i||^2, b_i = <p, mean - g_i>, c = ||p||^2, each distance is a quadratic in gamma
    (the b_i sum to 0). Computed in float64 from the honest messages' Gram matrix."""

    omniscient = True
    needs_messages = True
    KINDS = ("std", "sign", "unit")
    options: ClassVar[Options] = {
        "attack-perturbation": (
            "perturbation",
            "the direction p: std = -std, sign = -sign(mean), unit = -mean / ||mean||.",
            {"choices": KINDS},
        )
    }

    def __init__(self, perturbation: str = "std") -> None:
        if perturbation not in self.KINDS:
            raise ValueError(
                f"attack-perturbation={perturbation!r} is not valid; choose one of: {', '.join(self.KINDS)}"
            )
        self.perturbation = perturbation

    def _gamma(self, a: torch.Tensor, b: torch.Tensor, c: float, d2: torch.Tensor) -> float:
        raise NotImplementedError

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        g = s.messages.double()
        mean = g.mean(dim=0)
        p = _perturbation(self.perturbation, g)
        p = p / (float(p.abs().max()) or 1.0)  # the direction alone: gamma takes the size
        centred = mean - g
        scale = float(centred.abs().max()) or 1.0  # float64 squares of float32 values cannot overflow
        a = (centred / scale).pow(2).sum(dim=1)
        b = (centred / scale) @ p
        c = float(p @ p)
        gram = (g - g[0]) / scale
        gram = gram @ gram.T
        diag = torch.diagonal(gram)
        d2 = (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)
        gamma = self._gamma(a, b, c, d2) * scale if c > 0 else 0.0
        bad = (mean + gamma * p).clamp(-F32_MAX, F32_MAX)  # a message float32 can carry
        return bad.to(s.messages.dtype).expand(len(worker_ids), -1).clone()


class MinMax(_Shejwalkar):
    __doc__ = "MinMax: the largest gamma with max_i ||m - g_i|| <= max_ij ||g_i - g_j||. " + _Shejwalkar.__doc__

    name = "minmax"

    def _gamma(self, a, b, c, d2):
        limit = float(d2.max())
        # a_i + 2 gamma b_i + gamma^2 c <= limit for every i: the smallest positive root of all
        roots = (-b + torch.sqrt((b * b - c * (a - limit)).clamp_min(0))) / c
        return float(roots.min().clamp_min(0))


class MinSum(_Shejwalkar):
    __doc__ = (
        "MinSum: the largest gamma with sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2. " + _Shejwalkar.__doc__
    )

    name = "minsum"

    def _gamma(self, a, b, c, d2):
        # sum_i (a_i + 2 gamma b_i + gamma^2 c) = A + n c gamma^2 (the b_i sum to 0) <= S
        room = float(d2.sum(dim=1).max() - a.sum())
        return math.sqrt(max(room, 0.0) / (len(a) * c))


class _AgainstTheRule(Attack):
    """An attack whose one parameter is chosen each round against the rule in use (as ByzFL's
    optimised attacks): every value of a fixed grid is tried on the honest messages plus B copies
    of the candidate, and the one whose aggregate lands farthest from the honest mean is sent.
    The attacker knows the rule by name and parameters (its own copy, built from the run config),
    never the server's state: a stateful rule's copy is put back after each trial."""

    omniscient = True
    needs_messages = True
    GRID: ClassVar[tuple[float, ...]] = ()

    def __init__(self, rule: Any, num_byzantine: int) -> None:
        if num_byzantine < 1:
            raise ValueError(f"{self.name} needs at least one Byzantine worker, got {num_byzantine}")
        self.rule = rule
        self.num_byzantine = int(num_byzantine)
        self.last_choice: float | None = None  # the parameter of the last round (a diagnostic)

    def candidate(self, value: float, stats: HonestStats) -> torch.Tensor:
        raise NotImplementedError

    def craft(self, worker_ids, iteration, stats, dim):
        s = self._need(stats)
        honest = s.messages
        state = self.rule.state_dict()
        best, best_gap = None, -1.0
        for value in self.GRID:
            bad = self.candidate(value, s)
            trial = torch.cat([honest, bad.expand(self.num_byzantine, -1)])
            try:
                out = self.rule(trial).vector
            except ValueError:  # the rule refuses these messages: not a candidate
                continue
            finally:
                self.rule.load_state_dict(state)
            gap = float(torch.linalg.vector_norm(out.double() - s.mean.double()))
            if math.isfinite(gap) and gap > best_gap:
                best, best_gap, self.last_choice = bad, gap, value
        if best is None:
            best = self.candidate(self.GRID[0], s)
        return best.expand(len(worker_ids), -1).clone()


class OptimisedALIE(_AgainstTheRule):
    """ALIE with z chosen each round against the rule (mean - z * std, z on a grid 0.1..10)."""

    name = "alie-opt"
    GRID = tuple(float(z) for z in torch.logspace(-1, 1, 13).tolist())

    def candidate(self, value, stats):
        return stats.mean - value * stats.std


class OptimisedIPM(_AgainstTheRule):
    """IPM with epsilon chosen each round against the rule (-epsilon * mean, epsilon on a grid 0.01..100)."""

    name = "ipm-opt"
    GRID = tuple(float(e) for e in torch.logspace(-2, 2, 13).tolist())

    def candidate(self, value, stats):
        return -value * stats.mean


_POOL: ThreadPoolExecutor | None = None
_PREFETCHED: dict[tuple, _Draws] = {}


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # one thread: the draws are one call, parallel inside torch
        _POOL = ThreadPoolExecutor(max_workers=1)
    return _POOL


class _Draws:
    """(k, d) standard normal draws of ``standard_normals`` (worker w's from (seed, purpose, w,
    iteration)), made on a pool thread so that a CPU run's draws overlap with the honest step
    (torch releases the GIL while it computes)."""

    def __init__(self, key: tuple) -> None:
        self._future = _pool().submit(_draw, key)

    def result(self) -> torch.Tensor:
        return self._future.result()


def _draw(key: tuple) -> torch.Tensor:
    """The draws a ``_key(...)`` tuple names, made in the calling thread."""
    seed, purpose, worker_ids, iteration, dim = key
    return standard_normals(seed, torch.tensor(worker_ids, dtype=torch.int64), f"{purpose}/{iteration}", dim)


def _key(seed: int, purpose: str, worker_ids: list[int], iteration: int, dim: int) -> tuple:
    return seed, purpose, tuple(int(w) for w in worker_ids), iteration, dim


# Fewer draws than this are made inline, in the caller's thread: for a small model's noise (20 x 108
# draws, COVTYPE's logistic regression) the hand-over to the pool thread and back costs more than
# the draws, and on a busy machine (beside a two-job sweep on two cores) the caller then waits for
# the GIL: 1.7-2.4 ms per iteration measured there, where the draws themselves take 0.4 ms.
_THREADED_DRAWS = 1 << 16


def prefetch_noise(seed: int, purpose: str, worker_ids: list[int], iteration: int, dim: int) -> None:
    """Start drawing ``_noise``'s result in a background thread, so it overlaps with the honest
    workers' gradients (only for draws large enough to be worth a thread)."""
    if len(worker_ids) * dim < _THREADED_DRAWS:
        return
    key = _key(seed, purpose, worker_ids, iteration, dim)
    if key not in _PREFETCHED:
        _PREFETCHED.clear()
        _PREFETCHED[key] = _Draws(key)


def _noise(seed: int, purpose: str, worker_ids: list[int], iteration: int, dim: int) -> torch.Tensor:
    """(k, d) standard normal draws on the CPU, worker w's from (seed, purpose, w, iteration): the
    prefetched ones, or drawn now in this thread (the same numbers)."""
    key = _key(seed, purpose, worker_ids, iteration, dim)
    draws = _PREFETCHED.pop(key, None)
    return draws.result() if draws is not None else _draw(key)


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        Gaussian,
        SignFlip,
        ZeroGradient,
        ALIE,
        IPM,
        LabelFlip,
        Noise,
        Inf,
        Mimic,
        MinMax,
        MinSum,
        OptimisedALIE,
        OptimisedIPM,
    )
}
