"""Counter-based randomness: every draw is a pure function of (seed, stream, counter).

Workers draw their samples from streams keyed by their worker id and the iteration, so a
worker's numbers never depend on which node, Ray actor or engine computes them, and a run
resumed from a checkpoint needs no generator state.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any ints/strings (stable across processes)."""
    text = "/".join([str(int(seed)), *(str(k) for k in keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded with ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask the sign-extended bits to get a logical shift.
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _finalise_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on z, in place (``tmp``: scratch of z's shape; int64 arithmetic wraps
    modulo 2**64 as the algorithm needs). In place because fresh temporaries of a 20 x 20,000 draw
    cost 5x the arithmetic in page faults on a CPU."""
    for bits, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        # torch's >> on int64 is arithmetic; the mask makes it the logical shift the algorithm needs
        torch.bitwise_right_shift(z, bits, out=tmp).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(tmp)
        if factor is not None:
            z.mul_(factor)
    return z


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output for states z (a new tensor)."""
    z = z + _GOLDEN
    return _finalise_(z, torch.empty_like(z))


def draw_base(seed: int, counter: int) -> int:
    """The base of ``uniform_ints``' draws for (seed, counter), as a signed int64 value."""
    return _signed(derive_seed(seed, "uniform-ints", counter))


def uniform_ints(seed: int, streams: torch.Tensor, counter: int, count: int, high: torch.Tensor) -> torch.Tensor:
    """Integers uniform on ``[0, high[s])`` for every stream ``s``.

    Args:
        seed: the run's seed.
        streams: (k,) int64 stream ids (e.g. worker ids).
        counter: the draw's counter (e.g. the iteration); distinct counters give independent draws.
        count: number of draws per stream.
        high: (k,) int64 exclusive upper bounds, all >= 1.

    Returns:
        (k, count) int64 tensor on ``streams.device``.
    """
    return uniform_ints_at(torch.full_like(streams, draw_base(seed, counter)), streams, count, high)


def uniform_ints_at(base: torch.Tensor, streams: torch.Tensor, count: int, high: torch.Tensor) -> torch.Tensor:
    """``uniform_ints`` from its base (``draw_base``) held in a tensor: () or (k,) int64 on the
    streams' device, or (m, 1) for m counters at once (then (m, k, count) draws). With the base
    in a tensor the draws are a fixed sequence of kernels (no host value in them), which a CUDA
    graph can replay for any counter."""
    slots = torch.arange(count, dtype=torch.int64, device=streams.device)
    z = _splitmix(base ^ (streams.to(torch.int64) * _MIX1))
    z = _splitmix(z[..., None] + slots * _GOLDEN)
    # The top 53 bits give an exact float64 in [0, 1); scaling by an int is exact enough to
    # keep the draws identical on every device.
    unit = _shift_right(z, 11).to(torch.float64) * (1.0 / (1 << 53))
    return (unit * high.to(torch.float64)[:, None]).floor().to(torch.int64)


_LOW24 = (1 << 24) - 1


def standard_normals(seed: int, streams: torch.Tensor, counter: int | str, dim: int) -> torch.Tensor:
    """(k, dim) float32 draws of N(0, 1): row s a pure function of (seed, streams[s], counter), on
    the streams' device.

    Counter-based, so a GPU draws its own noise with a fixed sequence of kernels (no generator
    state, nothing from the host), and every device draws the same numbers: the integer part is
    exact everywhere; only ``log``/``cos``/``sin`` may differ in the last bit between devices.
    Each pair of draws is Box-Muller on two 24-bit uniforms cut from one SplitMix64 output
    (u1 in (0, 1], so |draw| <= 5.77: a tail mass of 8e-9 is cut, nothing an attack needs).
    """
    half = (dim + 1) // 2
    device = streams.device
    base = _signed(derive_seed(seed, "normals", counter))
    key = _splitmix((streams.to(torch.int64) * _MIX1) ^ base)
    slots = torch.arange(half, dtype=torch.int64, device=device).mul_(_GOLDEN)
    z = slots[None, :] + (key + _GOLDEN)[:, None]  # SplitMix64's state step, then its finaliser in place
    tmp = torch.empty_like(z)
    _finalise_(z, tmp)
    u1 = torch.bitwise_right_shift(z, 40, out=tmp).bitwise_and_(_LOW24).add_(1).to(torch.float32)
    radius = u1.mul_(1.0 / (1 << 24)).log_().mul_(-2.0).sqrt_()
    theta = z.bitwise_and_(_LOW24).to(torch.float32).mul_(2.0 * math.pi / (1 << 24))
    pair = torch.stack([theta.cos(), theta.sin_()], dim=1).mul_(radius[:, None])  # (k, 2, half)
    out = pair.view(key.shape[0], 2 * half)
    return out if dim == 2 * half else out[:, :dim].contiguous()
