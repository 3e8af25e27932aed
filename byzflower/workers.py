"""The workers one process computes messages for, shared by both engines (no Flower here).

The local engine hosts every worker in one ``HostedWorkers``; a Flower SuperNode hosts the
workers the server assigned to it (``byzflower.flower.node`` adds its state files). Either way
the honest workers form one estimator (state as stacked tensors), label-flipping Byzantine
workers a second one on flipped labels, and the other attacks craft their rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from byzflower.config import RunConfig, attack_of
from byzflower.data import ImageData
from byzflower.factory import byzantine_data, layout_of, make_estimator, worker_data
from clients.attacks import HonestStats, LabelFlip
from clients.estimators import Allocator
from clients.gradients import ModelGradients
from clients.graphs import GraphedEstimator

# (label) -> where that estimator keeps its state (None: ordinary tensors)
AllocatorFor = Callable[[str], Allocator | None]


class HostedWorkers:
    """Workers ``ids`` of one run: (H, d) honest messages and (B, d) Byzantine ones per iteration.

    Attributes:
        honest_ids, byzantine_ids: the hosted workers by role, ascending.
        estimator: the honest workers' estimator (None when none is hosted).
        poisoned: the label-flipping workers' estimator (None unless ``attack='label-flip'``).
        attack: the run's attack (None without Byzantine workers in the run).
    """

    def __init__(
        self,
        cfg: RunConfig,
        ids: list[int],
        data: ImageData,
        grads: ModelGradients,
        device: torch.device,
        allocator_for: AllocatorFor = lambda label: None,
        graphs: bool = False,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.grads = grads
        self.device = device
        self.honest_ids, self.byzantine_ids = layout_of(cfg).split(list(ids))
        self.estimator = None
        if self.honest_ids:
            label = f"workers-{self.honest_ids[0]}-{self.honest_ids[-1]}"
            honest = worker_data(cfg, data, self.honest_ids, device)
            self.estimator = make_estimator(cfg, grads, honest, allocator_for(label))
        self.attack = attack_of(cfg)
        if self.attack is not None:
            self.attack.to(device)
        self.poisoned = None
        if self.byzantine_ids and isinstance(self.attack, LabelFlip):
            label = f"byzantine-{self.byzantine_ids[0]}-{self.byzantine_ids[-1]}"
            flipped = byzantine_data(cfg, data, self.byzantine_ids, device, data.spec.classes)
            self.poisoned = make_estimator(cfg, grads, flipped, allocator_for(label))
        if graphs and device.type == "cuda":  # one CUDA graph replay per steady-state step
            if self.estimator is not None:
                self.estimator = GraphedEstimator(self.estimator, report=report)
            if self.poisoned is not None:
                self.poisoned = GraphedEstimator(self.poisoned, report=report)

    @property
    def crafted(self) -> bool:
        """Whether the Byzantine rows come from the attack (not from a poisoned estimator)."""
        return bool(self.byzantine_ids) and self.poisoned is None

    @property
    def omniscient(self) -> bool:
        return self.crafted and self.attack.omniscient

    def honest_step(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """(H, d) messages of the hosted honest workers at x, on this process's device."""
        if self.estimator is None:
            return torch.zeros(0, self.grads.dim, device=self.device)
        return self.estimator.step(x.to(self.device), iteration)

    def byzantine_step(self, x: torch.Tensor, iteration: int, stats: HonestStats | None) -> torch.Tensor:
        """(B, d) messages of the hosted Byzantine workers (``stats``: the honest messages' of
        this iteration, for omniscient attacks)."""
        if not self.byzantine_ids:
            return torch.zeros(0, self.grads.dim, device=self.device)
        if self.poisoned is not None:
            return self.poisoned.step(x.to(self.device), iteration)
        return self.attack.craft(self.byzantine_ids, iteration, stats, self.grads.dim)

    def prefetch(self, iteration: int) -> None:
        """Start the attack's random draws of ``iteration`` (they overlap with the honest step)."""
        if self.crafted:
            self.attack.prefetch(self.byzantine_ids, iteration, self.grads.dim)

    # -- state, like torch ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "honest": self.estimator.state_dict() if self.estimator is not None else None,
            "poisoned": self.poisoned.state_dict() if self.poisoned is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.estimator is not None:
            self.estimator.load_state_dict(state["honest"])
        if self.poisoned is not None:
            self.poisoned.load_state_dict(state["poisoned"])

    def reset(self) -> None:
        """Forget the workers' state: the next step rebuilds it at the current model (SAGA's
        table and average recomputed, SVRG's snapshot retaken, SARAH restarted)."""
        for estimator in (self.estimator, self.poisoned):
            if estimator is not None:
                estimator.reset()
