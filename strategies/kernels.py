"""Vectorised kernels behind the aggregation rules (pure torch/numpy, no Flower).

Distances: one n x n Gram matrix of the messages, centred at a message chosen as the medoid of a
coordinate sketch when the messages share a large common part (variance-reduced gradients).
Centring at a point inside the honest cluster keeps the Gram route accurate in float32 even then,
and outliers at 1e6 (which drag a mean away) do not move the medoid; squared distances below the Gram matrix's numerical
resolution are set to zero, so identical copies (sign-flip, zero-gradient attacks) are exactly
at distance 0. Order statistics: numpy's introselect, column blocks in parallel threads on CPU,
a sort on GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

_SKETCH_WIDTH = 512
_CHUNK, _CHUNK_FROM = 16384, 200_000  # centre wide inputs in blocks of _CHUNK columns
_POOL: ThreadPoolExecutor | None = None
_SCRATCH: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable work tensor: a fresh n x d allocation costs as much as a Gram matrix in page
    faults at d = 1e6, so the largest one used so far is kept (``release_scratch`` frees it)."""
    numel = math.prod(shape)
    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[(dtype, device)] = buf
    return buf[:numel].view(shape)


def release_scratch() -> None:
    _SCRATCH.clear()


@dataclass
class Gram:
    """G[i, j] = <m_i - c, m_j - c> / scale^2 in float64 (CPU), with c = m[center] (c = 0 when center = -1).

    ``wide``: the messages' magnitudes would overflow their own dtype in a product (attackers
    sending values up to 3.4e38), so the Gram matrix was formed in float64 and combinations of
    the messages must be too. ``scale`` (a power of 2, exact) is 1 except for float64 inputs
    beyond 1e150, which are scaled down before squaring.
    """

    matrix: torch.Tensor
    center: int
    resolution: float  # typical squared distance that rounding leaves unresolved (already / scale^2)
    eps: float  # relative rounding of one Gram entry: pairs with d2 below eps * max(G_ii, G_jj) are equal
    wide: bool = False
    scale: float = 1.0
    # (G, pair squared distances, row medians (lower, mean of the middle two)) as numpy, formed
    # once for the host-side rules; not an init field, so a replaced matrix (NNM) starts afresh.
    _host: tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def host(self) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(G (n, n), squared distances (n, n) unthresholded, row medians (lower, middle)) float64 numpy."""
        if self._host is None:
            g = self.matrix.numpy()
            d2 = _pair_distances_np(g)
            self._host = (g, d2, _row_medians(d2))
        return self._host


def _sketch(messages: torch.Tensor) -> torch.Tensor:
    """(n, <= 512) float64: 8 evenly spaced runs of 64 coordinates (all of them when d is small)."""
    n, d = messages.shape
    if d <= _SKETCH_WIDTH:
        return messages.to(torch.float64)
    runs, width = 8, _SKETCH_WIDTH // 8
    step = d // runs
    return messages[:, : runs * step].reshape(n, runs, step)[:, :, :width].reshape(n, -1).to(torch.float64)


def _sketch_distances(messages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared norms (n,), pairwise squared distances (n, n)) of the sketch, float64, on the messages' device."""
    s = _sketch(messages)
    sq = (s * s).sum(dim=1)
    return sq, (sq[:, None] + sq[None, :] - 2.0 * (s @ s.T)).clamp_min_(0.0)


def _survey(messages: torch.Tensor) -> tuple[float, int, bool]:
    """(max |m_ij|, medoid index, whether centring pays), from one read of the device: a GPU is
    waited for once, not once per figure.

    The medoid (smallest sum of sketched distances to the others, in float64) is a cheap first
    guess only: ``centered_gram`` checks it on all coordinates, so an attacker who knows which
    coordinates are sketched gains nothing by crafting them. It lies inside the honest cluster
    whenever most messages are honest. Centring at it is worth its pass over the messages when the
    messages share a common part: when their squared norms are over 4x their squared distances
    to the medoid, an uncentred Gram matrix would resolve distances more than 4x (2 bits) worse.
    """
    n = messages.shape[0]
    if n == 0:
        return 0.0, 0, False
    lo, hi = torch.aminmax(messages)
    parts = [torch.stack([lo, hi]).to(torch.float64)]
    if n > 2:
        parts += [t.reshape(-1) for t in _sketch_distances(messages)]
    host = torch.cat(parts).cpu().numpy()
    top = max(-float(host[0]), float(host[1]))
    if n <= 2:
        return top, 0, False
    sq, d2 = host[2 : 2 + n], host[2 + n :].reshape(n, n)
    medoid = _medoid(d2)
    return top, medoid, bool(_lower_median(sq) > 4.0 * _lower_median(d2[medoid]))


def _medoid(d2: np.ndarray) -> int:
    """The row with the smallest sum of distances to the others, from squared distances (n, n)."""
    return int(np.argmin(np.sqrt(d2).sum(axis=1)))


def _lower_median(v: np.ndarray) -> float:
    """The lower middle value of a 1-d array (torch's ``median``)."""
    k = (v.shape[0] - 1) // 2
    return float(np.partition(v, k)[k])


def _row_medians(d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (lower middle value, numpy's median), from one partial sort."""
    n = d2.shape[1]
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(d2, (lo, hi) if hi > lo else (lo,), axis=1)
    return part[:, lo], (part[:, lo] + part[:, hi]) * 0.5


def _pair_distances_np(g: np.ndarray) -> np.ndarray:
    diag = np.diag(g)
    with np.errstate(invalid="ignore", over="ignore"):  # a GPU's unscreened blind round may hold NaN
        d2 = diag[:, None] + diag[None, :]
        d2 -= 2.0 * g
        return np.maximum(d2, 0.0, out=d2)


def _work_format(messages: torch.Tensor, top: float) -> tuple[torch.dtype, float]:
    """(dtype of the product, power-of-2 scale) such that no centred squared norm of messages of
    magnitude ``top`` (max |m_ij|) can overflow."""
    d = max(messages.shape[1], 1)

    def bound(dtype: torch.dtype) -> float:
        return math.sqrt(torch.finfo(dtype).max / (16.0 * d))

    dtype = messages.dtype if top <= bound(messages.dtype) else torch.float64
    limit = bound(dtype)
    scale = 2.0 ** math.ceil(math.log2(top / limit)) if top > limit else 1.0
    return dtype, scale


def _device_product(messages: torch.Tensor, center: int | torch.Tensor, dtype: torch.dtype, scale: float):
    """(n, n) <m_i - c, m_j - c> / scale^2 in ``dtype`` on the messages' device; ``center`` a row
    index (-1: none) or a 0-d index tensor on the device (chosen there, never read back).

    Wide inputs are centred block by block into a small buffer that feeds the product directly,
    instead of writing and re-reading an n x d copy."""
    n, d = messages.shape
    on_device = isinstance(center, torch.Tensor)
    centred = on_device or center >= 0

    def row(m: torch.Tensor) -> torch.Tensor:  # the centre's row of m (a copy, safe to subtract in place)
        return m.index_select(0, center.view(1))[0] if on_device else m[center].clone()

    if not centred and dtype == messages.dtype and scale == 1.0:
        g = messages @ messages.T
    elif d <= _CHUNK_FROM:
        x = scratch((n, d), dtype, messages.device)
        if dtype == messages.dtype and centred:
            torch.sub(messages, row(messages), out=x)
        else:  # widened: subtract in the wide dtype, where 3.4e38 - (-3.4e38) is finite
            x.copy_(messages)
            if centred:
                x.sub_(row(x))
        if scale != 1.0:
            x.mul_(1.0 / scale)
        g = x @ x.T
    else:
        c = row(messages).to(dtype) if centred else torch.zeros(d, dtype=dtype, device=messages.device)
        g = torch.zeros(n, n, dtype=dtype, device=messages.device)
        buf = scratch((n, _CHUNK), dtype, messages.device)
        for start in range(0, d, _CHUNK):
            end = min(start + _CHUNK, d)
            x = buf[:, : end - start]
            if dtype == messages.dtype:
                torch.sub(messages[:, start:end], c[start:end], out=x)
            else:
                x.copy_(messages[:, start:end]).sub_(c[start:end])
            if scale != 1.0:
                x.mul_(1.0 / scale)
            g.addmm_(x, x.T)
    return g


def _raw_gram(messages: torch.Tensor, center: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """(n, n) float64 CPU: <m_i - c, m_j - c> / scale^2 (c = m[center], none when -1), the product in ``dtype``."""
    g = _device_product(messages, center, dtype, scale).to(device="cpu", dtype=torch.float64)
    return (g + g.T) * 0.5


def _blind_gram(messages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Gram matrix as ``_raw_gram``, centre) of float32 messages on an accelerator, from one read.

    Nothing is read before the product: it runs in float64, where no float32 magnitude can
    overflow (so no survey of the magnitudes is needed), centred at the sketch's medoid, which the
    device picks itself. The matrix and the centre then come back together."""
    n = messages.shape[0]
    _, d2 = _sketch_distances(messages)
    center = d2.sqrt().sum(dim=1).argmin()
    g = _device_product(messages, center, torch.float64, 1.0)
    host = torch.cat([g.reshape(-1), center.to(torch.float64).reshape(1)]).cpu()
    g = host[: n * n].reshape(n, n)
    return (g + g.T) * 0.5, int(host[-1])


def _narrow_gram(messages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Gram matrix as ``_raw_gram``, centre) of at most ``_SKETCH_WIDTH`` columns on the CPU,
    formed in float64 from one copy, centred at the medoid of the exact distances."""
    x = messages.detach().numpy().astype(np.float64)
    center = _medoid(_pair_distances_np(x @ x.T))
    x -= x[center]
    g = x @ x.T
    return torch.from_numpy((g + g.T) * 0.5), center


def centered_gram(messages: torch.Tensor) -> Gram:
    """The Gram matrix of the messages, centred at a message inside the bulk of them.

    The first guess of the centre comes from a coordinate sketch; it is then checked on every
    coordinate: if some message's median squared distance to the others is over 16x smaller
    than the centre's (the centre is far from the bulk: a crafted row, or no centring where the
    messages share a large common part), the matrix is recomputed once, centred at that message.
    The product runs in the messages' dtype unless their magnitude could overflow it; on an
    accelerator (float32 messages, reads not free) in float64 always, from one read (``_blind_gram``);
    on the CPU for float32 messages of at most 512 coordinates in float64 too, in numpy (``_narrow_gram``).
    """
    n, d = messages.shape
    if n > 2 and messages.dtype == torch.float32 and not reads_are_free(messages):
        # an accelerator: one read instead of two (the survey's, then the matrix's)
        dtype, scale = torch.float64, 1.0
        g, center = _blind_gram(messages)
    elif n > 2 and d <= _SKETCH_WIDTH and messages.dtype == torch.float32 and reads_are_free(messages):
        # narrow messages on the CPU (logistic regression on IJCNN1: d = 46): the sketch is every
        # coordinate, so one float64 copy gives exact distances, the medoid and the product
        # (no float32 value overflows there), in a few numpy calls instead of a dozen torch ones
        dtype, scale = torch.float64, 1.0
        g, center = _narrow_gram(messages)
    else:
        top, center, worth = _survey(messages)
        dtype, scale = _work_format(messages, top)
        center = center if worth else -1
        g = _raw_gram(messages, center, dtype, scale)
    host, typical_sq = None, None
    if n > 2:
        gn = g.numpy()
        d2 = _pair_distances_np(gn)
        medians = _row_medians(d2)
        typical = medians[0]  # each message's (lower) median squared distance to the others
        best = int(np.argmin(typical))
        quality = _lower_median(np.diag(gn))  # the centre's (or the origin's) median squared distance
        if quality > 16.0 * float(typical[best]) and best != center:
            center = best
            g = _raw_gram(messages, center, dtype, scale)
        else:
            host, typical_sq = (gn, d2, medians), quality
    # A float dot product of length d is off by about eps * sqrt(d) * |x| * |y|.
    eps = 4.0 * torch.finfo(dtype).eps * math.sqrt(d)
    if typical_sq is None:  # (the centre's median squared distance, unless computed above for this matrix)
        typical_sq = _lower_median(np.diag(g.numpy())) if n else 0.0
    gram = Gram(g, center, eps * max(typical_sq, 0.0), eps, wide=dtype != messages.dtype, scale=scale)
    gram._host = host
    return gram


def squared_distances(gram: Gram) -> torch.Tensor:
    """(n, n) float64 squared distances ||m_i - m_j||^2 (divided by scale^2), exact zeros on the
    diagonal and for pairs closer than their own magnitudes let the Gram matrix resolve."""
    diag = gram.matrix.diagonal()
    d2 = torch.from_numpy(gram.host()[1].copy())
    d2[d2 < gram.eps * torch.maximum(diag[:, None], diag[None, :])] = 0.0
    d2.fill_diagonal_(0.0)
    return d2


def _median_sq_distance(g: np.ndarray, alpha: np.ndarray) -> float:
    """Median over i of ||m_i - z||^2 for z = sum_j alpha_j m_j."""
    ga = g @ alpha
    return float(_row_medians((np.diag(g) - 2.0 * ga + alpha @ ga)[None, :])[1][0])


def robust_start(gram: Gram, point_weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(weights of Weiszfeld's start, the data's scale) from a Gram matrix.

    The scale is the medoid's median distance to the others (the medoid: the message with the
    smallest such median). The start is the mean (the paper's) unless it lies outside the bulk
    of the messages, else the mean of the half of them nearest to the medoid. Both starts lead
    to the same limit, but attackers far away drag the mean with them, and Weiszfeld then needs
    about log(distance / spread) iterations to come back (over 80 from 1e38). A start at a
    message would stall: its own weight is 1 / floor. With ``point_weights`` the mean is the
    weighted one.
    """
    g, d2, (_, typical) = gram.host()
    n = g.shape[0]
    mean = np.full(n, 1.0 / n) if point_weights is None else point_weights / float(np.sum(point_weights))
    medoid = int(np.argmin(typical))
    scale = math.sqrt(float(typical[medoid]))
    if scale == 0.0:  # over half the messages coincide: the finest distance present is the scale
        positive = d2[d2 > 0]
        scale = math.sqrt(float(positive.min())) if positive.size else 0.0
    half = np.argsort(d2[medoid], kind="stable")[: max(1, (n + 1) // 2)]
    bulk = np.zeros(n)
    bulk[half] = 1.0 / len(half)
    start = mean if _median_sq_distance(g, mean) <= 4.0 * _median_sq_distance(g, bulk) else bulk
    return start, scale


def weiszfeld(
    gram: Gram, tol: float, max_iter: int, eps: float, point_weights: np.ndarray | None = None
) -> tuple[np.ndarray, int, float]:
    """Weiszfeld iterations on the coefficients alpha of z = sum_i alpha_i m_i, from ``robust_start``.

    ``tol`` and ``eps`` are relative to the data's scale (see ``robust_start``): stop when an
    iterate moves by at most tol * scale. Messages closer to the iterate than eps * scale (or
    the Gram matrix's resolution) count as sitting on it, handled as Vardi and Zhang do, so
    coincident messages (copies, or NNM's identical mixtures) are neither divided by zero nor
    given an arbitrary finite weight. Returns (alpha, iterations used, last step / scale).
    The loop runs on the host in as few numpy calls as the math allows: on a GPU it is the
    part of the iteration the device waits for. ``point_weights`` (n,) > 0: the weighted median
    argmin_z sum_i a_i ||m_i - z|| (RFA's, a_i the clients' sample counts), started at the
    weighted mean where the unweighted start is the mean.
    """
    g = gram.host()[0]
    n = g.shape[0]
    diag = np.diag(g).copy()
    a = None if point_weights is None else np.asarray(point_weights, dtype=np.float64) / float(np.sum(point_weights))
    alpha, spread = robust_start(gram, a)
    spread = spread or 1.0  # all messages equal: any tolerance does
    floor = max(eps * spread, math.sqrt(gram.resolution), np.finfo(np.float64).tiny)
    step, used = math.inf, 0
    dist = np.empty(n)
    for used in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        ga = g @ alpha
        np.subtract(diag, 2.0 * ga, out=dist)
        dist += alpha @ ga
        np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
        at = dist <= floor  # messages the iterate sits on (to the Gram matrix's resolution)
        sitting = int(np.count_nonzero(at))
        if sitting == n:
            step = 0.0
            break
        w = 1.0 / np.maximum(dist, floor)
        if a is not None:
            w *= a
        if sitting:
            w[at] = 0.0
        new = w / w.sum()
        if sitting:
            # Vardi and Zhang (2000): at a point of multiplicity k, move towards the Weiszfeld
            # point of the others only as far as their pull ||R|| exceeds k; stay if it does not.
            # (Flooring the distances instead would bias the result by about floor * B / H.)
            toward = new - alpha
            pull = w.sum() * math.sqrt(max(float(toward @ g @ toward), 0.0))
            mass = sitting if a is None else float(a[at].sum())  # the weight sitting on the iterate
            keep = min(1.0, mass / pull) if pull > 0 else 1.0
            new = alpha + (1.0 - keep) * toward
        delta = new - alpha
        step = math.sqrt(max(float(delta @ g @ delta), 0.0)) / spread
        alpha = new
        if step <= tol:
            break
    return alpha, used, step


def combine(messages: torch.Tensor, alpha: np.ndarray, gram: Gram) -> torch.Tensor:
    """sum_i alpha_i m_i as a (d,) tensor in the messages' dtype and device.

    The float64 weights lose their sum when cast to the messages' dtype (by up to n * eps, which
    is many ulps of the result); the lost weight is given back on a central message, so the
    combination keeps its total weight. Inputs whose magnitude could overflow are combined in
    float64.
    """
    if gram.wide:
        a = torch.from_numpy(alpha)
        if not reads_are_free(messages):  # pinned: the copy to the device does not hold up the host
            a = a.pin_memory() if torch.cuda.is_available() else a
        a = a.to(device=messages.device, non_blocking=True)
        return (a @ messages.to(torch.float64)).to(messages.dtype)
    a = torch.from_numpy(alpha).to(dtype=messages.dtype)  # cast on the host: the lost weight needs no device read
    lost = float(alpha.sum()) - float(a.double().sum())
    out = a.to(messages.device) @ messages
    if lost:
        pivot = gram.center if gram.center >= 0 else int(np.argmax(np.abs(alpha)))
        out.add_(messages[pivot], alpha=lost)
    return out


try:  # the numpy BLAS's threads, limited during an aggregation (optional: a bare torch image may lack it)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then the BLAS keeps its own threading
    ThreadpoolController = None
_HOST_BLAS_DEPTH = 0


@functools.cache
def _host_blas() -> ThreadpoolController:
    """The numpy BLAS libraries' controller (found once: it scans the loaded libraries)."""
    return ThreadpoolController().select(user_api="blas")


@contextlib.contextmanager
def host_blas_one_thread() -> Iterator[None]:
    """numpy's BLAS on one thread for the duration (restored after; nested calls are free).

    The host's products here are small (n x n Gram matrices, narrow messages' Gram matrix of at most
    512 columns), and a multi-threaded BLAS waits for its helper thread, which a busy machine does
    not schedule: beside a two-job sweep on 2 cores, the 70 x 108 Gram product of COVTYPE's logistic
    regression took 10.7 ms per call instead of 0.2 ms. The numbers are the same on any number of
    threads (the BLAS splits the rows, not the sums; checked for these shapes). Not thread-safe in
    its bookkeeping: aggregations in concurrent threads may run their products on more threads."""
    global _HOST_BLAS_DEPTH
    if ThreadpoolController is None or _HOST_BLAS_DEPTH:
        yield
        return
    _HOST_BLAS_DEPTH += 1
    try:
        with _host_blas().limit(limits=1):
            yield
    finally:
        _HOST_BLAS_DEPTH -= 1


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether the host reads ``t``'s values for free (a CPU tensor). Where it does, a branch on a
    value is the cheap way; on a GPU the same decision is taken by kernels (``torch.where``), so
    the host never waits for the device."""
    return t.device.type == "cpu"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, read on the host: one summing pass where
    ``isfinite(t).all()`` takes four (a finite sum proves every entry finite; only where the sum is
    not finite, a non-finite entry or finite ones that overflow it, are the entries checked). On
    the host the sum's finiteness is read as a Python float: ``torch.isfinite`` alone costs three
    kernel calls, as much as the sum of a small model's aggregate (measured: 13 us against 4)."""
    total = t.sum()
    finite = math.isfinite(float(total)) if reads_are_free(total) else bool(torch.isfinite(total))
    return finite or bool(torch.isfinite(t).all())


def safe_mean(messages: torch.Tensor) -> torch.Tensor:
    """The mean over rows in the messages' dtype; in float64 when their sum overflows the dtype
    (a mean of finite values is always representable)."""
    out = messages.mean(dim=0)
    if reads_are_free(out) and all_finite(out):
        return out
    ok = torch.isfinite(out).all()
    wide = messages.mean(dim=0, dtype=torch.float64).to(messages.dtype)
    return wide if reads_are_free(out) else torch.where(ok, out, wide)


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """(n,) Krum scores: sum of the n - f - 2 smallest squared distances to the other messages."""
    n = d2.shape[0]
    k = max(1, n - f - 2)
    others = d2.clone()
    others.fill_diagonal_(math.inf)
    scores = torch.topk(others, k, dim=1, largest=False).values.sum(dim=1)
    return scores.nan_to_num_(nan=math.inf)  # never select a row whose score is undefined


def iterated_krum(d2: torch.Tensor, f: int, count: int) -> list[int]:
    """Bulyan's selection: ``count`` indices, each the Krum choice among those not yet chosen."""
    remaining = list(range(d2.shape[0]))
    chosen: list[int] = []
    for _ in range(count):
        idx = torch.tensor(remaining)
        scores = krum_scores(d2[idx][:, idx], f)
        best = remaining[int(torch.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def nearest_neighbour_weights(d2: torch.Tensor, f: int) -> torch.Tensor:
    """(n, n) float64 mixing matrix: row i averages the n - f messages nearest to m_i (itself included)."""
    n = d2.shape[0]
    k = n - f
    nearest = torch.topk(d2, k, dim=1, largest=False).indices
    mix = torch.zeros(n, n, dtype=torch.float64)
    mix.scatter_(1, nearest, 1.0 / k)
    return mix


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    return _POOL


def _by_column_blocks(block, d: int) -> None:
    """Run ``block(start, end)`` over the d columns: in one piece when small, else one block per
    pool thread (numpy releases the GIL in its sorts and partitions)."""
    workers = _pool()._max_workers
    if workers == 1 or d < 8192:
        block(0, d)
    else:
        edges = np.linspace(0, d, workers + 1).astype(int)
        list(_pool().map(lambda i: block(edges[i], edges[i + 1]), range(workers)))


def order_statistic_mean(messages: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(d,) per coordinate, the mean of the order statistics lo..hi-1 (0-based, ascending).

    (lo, hi) = ((n-1)//2, n//2 + 1) is the median, (f, n - f) the f-trimmed mean.
    """
    n, d = messages.shape
    if not 0 <= lo < hi <= n:
        raise ValueError(f"order statistics {lo}..{hi - 1} are outside 0..{n - 1}")
    if not reads_are_free(messages):  # a GPU: a sort, no host copy
        return safe_mean(messages.sort(dim=0).values[lo:hi])
    a = messages.detach().contiguous().numpy()
    out = np.empty(d, dtype=a.dtype)
    kth = (lo, hi - 1) if hi - 1 > lo else (lo,)

    def block(start: int, end: int) -> None:
        part = np.partition(a[:, start:end], kth, axis=0)[lo:hi]
        with np.errstate(over="ignore", invalid="ignore"):  # (inf + -inf: NaN, redone below)
            mean = part.mean(axis=0)
        if not np.isfinite(mean).all():  # values near the dtype's limit: their sum overflows it
            mean = part.mean(axis=0, dtype=np.float64)
        out[start:end] = mean

    _by_column_blocks(block, d)
    return torch.from_numpy(out)


def closest_to_median_mean(messages: torch.Tensor, keep: int) -> torch.Tensor:
    """(d,) per coordinate, the mean of the ``keep`` values closest to the coordinate-wise median.

    The ``keep`` values nearest any point are a window of the sorted column, so each column is
    sorted once and the window is the one of the n - keep + 1 candidates whose farther end is
    nearest the median (Meamed; Bulyan's second stage)."""
    n, d = messages.shape
    if not 1 <= keep <= n:
        raise ValueError(f"keep={keep} is outside 1..{n}")
    if not reads_are_free(messages):  # a GPU: a sort, no host copy
        median = order_statistic_mean(messages, (n - 1) // 2, n // 2 + 1)
        gap = messages.double() - median.double()  # float64 as on the host: no overflow, nothing to read back
        closest = torch.topk(gap.abs(), keep, dim=0, largest=False).indices
        return safe_mean(torch.gather(messages, 0, closest))
    a = messages.detach().contiguous().numpy()
    out = np.empty(d, dtype=a.dtype)
    starts = np.arange(n - keep + 1)

    def block(lo: int, hi: int) -> None:
        x = np.sort(a[:, lo:hi], axis=0).astype(np.float64)  # float64: no gap or sum overflows
        median = (x[(n - 1) // 2] + x[n // 2]) / 2
        reach = np.maximum(median - x[starts], x[starts + keep - 1] - median)  # (candidates, columns)
        first = np.argmin(reach, axis=0)
        rows = first[None, :] + np.arange(keep)[:, None]
        out[lo:hi] = np.take_along_axis(x, rows, axis=0).mean(axis=0)

    _by_column_blocks(block, d)
    return torch.from_numpy(out)
