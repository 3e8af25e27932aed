"""What a SuperNode does for the workers it hosts (no Flower here; the ClientApp adapts it)."""

from __future__ import annotations

import torch

from byzflower.config import RunConfig, attack_of
from byzflower.factory import (
    byzantine_data,
    dataset_of,
    device_of,
    gradients_of,
    layout_of,
    make_estimator,
    worker_data,
)
from byzflower.node_state import mapped_allocator, run_state_dir
from clients.attacks import HonestStats, LabelFlip


class NodeWorkers:
    """The workers of node ``partition_id`` of ``num_partitions`` for one run."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int, run_id: int) -> None:
        self.cfg = cfg
        self.layout = layout_of(cfg)
        self.workers = list(self.layout.node_workers(partition_id, num_partitions))
        self.honest, self.byzantine = self.layout.split(self.workers)
        self.device = device_of(cfg)
        data = dataset_of(cfg)
        self.grads = gradients_of(cfg, data, self.device)
        self.estimator = None
        if self.honest:
            folder = run_state_dir(run_id) / f"workers-{self.honest[0]}-{self.honest[-1]}"
            self.estimator = make_estimator(
                cfg, self.grads, worker_data(cfg, data, self.honest, self.device), mapped_allocator(folder)
            )
        self.attack = attack_of(cfg)
        self.poisoned = None  # label-flip: the honest estimator on flipped labels
        if self.byzantine and isinstance(self.attack, LabelFlip):
            folder = run_state_dir(run_id) / f"byzantine-{self.byzantine[0]}-{self.byzantine[-1]}"
            poisoned = byzantine_data(cfg, data, self.byzantine, self.device, data.spec.classes)
            self.poisoned = make_estimator(cfg, self.grads, poisoned, mapped_allocator(folder))

    def rebuild(self) -> None:
        """Forget the workers' state: the next step rebuilds it at the current model (SAGA's
        table and average recomputed, SVRG's snapshot retaken, SARAH restarted)."""
        for estimator in (self.estimator, self.poisoned):
            if estimator is not None:
                estimator.state["step"].zero_()

    @property
    def omniscient(self) -> bool:
        return self.attack is not None and self.attack.omniscient

    def honest_messages(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """(len(honest), d) messages of the node's honest workers at x."""
        if self.estimator is None:
            return torch.zeros(0, self.grads.dim)
        return self.estimator.step(x.to(self.device), iteration).cpu()

    def byzantine_messages(self, x: torch.Tensor, iteration: int, stats: HonestStats | None) -> torch.Tensor:
        """(len(byzantine), d) messages of the node's Byzantine workers."""
        if not self.byzantine:
            return torch.zeros(0, self.grads.dim)
        if self.poisoned is not None:
            return self.poisoned.step(x.to(self.device), iteration).cpu()
        return self.attack.craft(self.byzantine, iteration, stats, self.grads.dim).cpu()
