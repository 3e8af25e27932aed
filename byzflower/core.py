"""What every engine shares and that needs no Flower: the role-blind order of the messages.

The Flower strategy, the harness and the in-process engine all import it from here, so the
local engine (and the GPU machines, which have torch but not Flower) never import Flower.
"""

from __future__ import annotations

import torch

from clients.rng import derive_seed


def role_blind_order(seed: int, iteration: int, num_workers: int) -> list[int]:
    """The order in which the Strategy receives the workers' messages at ``iteration``: a seeded
    permutation, so position says nothing about role."""
    return role_blind_permutation(seed, iteration, num_workers).tolist()


def role_blind_permutation(seed: int, iteration: int, num_workers: int) -> torch.Tensor:
    """``role_blind_order`` as a (num_workers,) int64 CPU tensor: entry p is the worker at position p."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", iteration))
    return torch.randperm(num_workers, generator=gen)


def role_blind_positions(seed: int, first: int, count: int, num_workers: int) -> torch.Tensor:
    """(count, num_workers) int64: row i holds, for each worker, its position at iteration first + i.

    Built on the host for a block of iterations at once, so an engine copies it to its device once
    per block instead of once per iteration.
    """
    out = torch.empty(count, num_workers, dtype=torch.int64)
    ranks = torch.arange(num_workers)
    for i in range(count):
        out[i, role_blind_permutation(seed, first + i, num_workers)] = ranks
    return out
