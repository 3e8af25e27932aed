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

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    """G[i, j] = <m_i - c, m_j - c> in float64 (CPU), with c = m[center] (c = 0 when center = -1)."""

    matrix: torch.Tensor
    center: int
    resolution: float  # squared distances below this are indistinguishable from 0


def _sketch(messages: torch.Tensor) -> torch.Tensor:
    """(n, <= 512) float64: 8 evenly spaced runs of 64 coordinates (all of them when d is small)."""
    n, d = messages.shape
    if d <= _SKETCH_WIDTH:
        return messages.to(torch.float64)
    runs, width = 8, _SKETCH_WIDTH // 8
    step = d // runs
    return messages[:, : runs * step].reshape(n, runs, step)[:, :, :width].reshape(n, -1).to(torch.float64)


def sketch_center(messages: torch.Tensor) -> tuple[int, bool]:
    """(medoid index, whether centring pays) from a coordinate sketch, in float64.

    The medoid (smallest sum of sketched distances to the others) lies inside the honest cluster
    whenever most messages are honest. Centring at it is worth its pass over the messages when the
    messages share a common part: when their squared norms are over 4x their squared distances
    to the medoid, an uncentred Gram matrix would resolve distances more than 4x (2 bits) worse.
    """
    s = _sketch(messages)
    sq = (s * s).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (s @ s.T)).clamp_min_(0.0)
    medoid = int(torch.argmin(d2.sqrt().sum(dim=1)))
    return medoid, bool(sq.median() > 4.0 * d2[medoid].median())


def sketch_medoid(messages: torch.Tensor) -> int:
    """Index of the message with the smallest sum of sketched distances to the others."""
    return sketch_center(messages)[0]


def centered_gram(messages: torch.Tensor) -> Gram:
    """The Gram matrix of the messages, centred at their sketch medoid when that gains precision.

    The matrix product runs in the messages' dtype. Wide inputs are centred block by block into a
    small buffer that feeds the product directly, instead of writing and re-reading an n x d copy.
    """
    n, d = messages.shape
    center, worth = sketch_center(messages) if n > 2 else (0, False)
    if not worth:
        g, center = messages @ messages.T, -1
    elif d <= _CHUNK_FROM:
        c = messages[center]
        x = torch.sub(messages, c, out=scratch((n, d), messages.dtype, messages.device))
        g = x @ x.T
    else:
        c = messages[center]
        g = torch.zeros(n, n, dtype=messages.dtype, device=messages.device)
        buf = scratch((n, _CHUNK), messages.dtype, messages.device)
        for start in range(0, d, _CHUNK):
            end = min(start + _CHUNK, d)
            x = torch.sub(messages[:, start:end], c[start:end], out=buf[:, : end - start])
            g.addmm_(x, x.T)
    g = g.to(device="cpu", dtype=torch.float64)
    g = (g + g.T) * 0.5
    # A float dot product of length d is off by about eps * sqrt(d) * |x| * |y|.
    eps = torch.finfo(messages.dtype).eps
    scale = float(g.diagonal().median()) if n else 0.0
    return Gram(g, center, 4.0 * eps * math.sqrt(d) * max(scale, 0.0))


def squared_distances(gram: Gram) -> torch.Tensor:
    """(n, n) float64 squared distances ||m_i - m_j||^2, exact zeros on the diagonal and for
    pairs closer than the Gram matrix resolves."""
    g = gram.matrix
    diag = g.diagonal()
    d2 = diag[:, None] + diag[None, :] - 2.0 * g
    d2[d2 < gram.resolution] = 0.0
    d2.fill_diagonal_(0.0)
    return d2


def weiszfeld(gram: Gram, tol: float, max_iter: int, eps: float) -> tuple[np.ndarray, int, float]:
    """Weiszfeld iterations on the coefficients alpha of z = sum_i alpha_i m_i, from the mean.

    Returns (alpha, iterations used, length of the last step).
    """
    g = gram.matrix.numpy()
    n = g.shape[0]
    diag = np.diag(g).copy()
    floor = max(eps, math.sqrt(gram.resolution))
    alpha = np.full(n, 1.0 / n)
    step, used = math.inf, 0
    for used in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        ga = g @ alpha
        dist = np.sqrt(np.maximum(diag - 2.0 * ga + alpha @ ga, 0.0))
        np.maximum(dist, floor, out=dist)
        w = 1.0 / dist
        new = w / w.sum()
        delta = new - alpha
        step = math.sqrt(max(float(delta @ g @ delta), 0.0))
        alpha = new
        if step <= tol:
            break
    return alpha, used, step


def combine(messages: torch.Tensor, alpha: np.ndarray) -> torch.Tensor:
    """sum_i alpha_i m_i as a (d,) tensor in the messages' dtype and device."""
    a = torch.from_numpy(alpha).to(device=messages.device, dtype=messages.dtype)
    return a @ messages


def krum_scores(d2: torch.Tensor, f: int) -> torch.Tensor:
    """(n,) Krum scores: sum of the n - f - 2 smallest squared distances to the other messages."""
    n = d2.shape[0]
    k = max(1, n - f - 2)
    others = d2.clone()
    others.fill_diagonal_(math.inf)
    return torch.topk(others, k, dim=1, largest=False).values.sum(dim=1)


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


def order_statistic_mean(messages: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(d,) per coordinate, the mean of the order statistics lo..hi-1 (0-based, ascending).

    (lo, hi) = ((n-1)//2, n//2 + 1) is the median, (f, n - f) the f-trimmed mean.
    """
    n, d = messages.shape
    if not 0 <= lo < hi <= n:
        raise ValueError(f"order statistics {lo}..{hi - 1} are outside 0..{n - 1}")
    if messages.device.type != "cpu":
        return messages.sort(dim=0).values[lo:hi].mean(dim=0)
    a = messages.detach().contiguous().numpy()
    out = np.empty(d, dtype=a.dtype)
    kth = (lo, hi - 1) if hi - 1 > lo else (lo,)

    def block(start: int, end: int) -> None:
        part = np.partition(a[:, start:end], kth, axis=0)
        out[start:end] = part[lo:hi].mean(axis=0)

    workers = _pool()._max_workers
    if workers == 1 or d < 8192:
        block(0, d)
    else:
        edges = np.linspace(0, d, workers + 1).astype(int)
        list(_pool().map(lambda i: block(edges[i], edges[i + 1]), range(workers)))
    return torch.from_numpy(out)
