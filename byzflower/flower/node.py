"""What a SuperNode does for the workers it hosts (no Flower here; the ClientApp adapts it)."""

from __future__ import annotations

from pathlib import Path

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
from byzflower.flower.node_state import mapped_allocator, run_state_dir, state_key
from clients.attacks import HonestStats, LabelFlip


class NodeWorkers:
    """The workers of node ``partition_id`` of ``num_partitions`` for one run."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int, run_id: int | str) -> None:
        self.cfg = cfg
        self.state_key = state_key(cfg, run_id) if isinstance(run_id, int) else run_id
        self.layout = layout_of(cfg)
        self.workers = list(self.layout.node_workers(partition_id, num_partitions))
        self.honest, self.byzantine = self.layout.split(self.workers)
        self.device = device_of(cfg)
        data = dataset_of(cfg)
        self.grads = gradients_of(cfg, data, self.device)
        self.estimator = None
        if self.honest:
            folder = run_state_dir(self.state_key) / f"workers-{self.honest[0]}-{self.honest[-1]}"
            self.estimator = make_estimator(
                cfg, self.grads, worker_data(cfg, data, self.honest, self.device), mapped_allocator(folder)
            )
        self.attack = attack_of(cfg)
        self.poisoned = None  # label-flip: the honest estimator on flipped labels
        if self.byzantine and isinstance(self.attack, LabelFlip):
            folder = run_state_dir(self.state_key) / f"byzantine-{self.byzantine[0]}-{self.byzantine[-1]}"
            poisoned = byzantine_data(cfg, data, self.byzantine, self.device, data.spec.classes)
            self.poisoned = make_estimator(cfg, self.grads, poisoned, mapped_allocator(folder))

    def _estimators(self) -> list:
        return [e for e in (self.estimator, self.poisoned) if e is not None]

    def _checkpoint_path(self, iteration: int) -> Path:
        folder = run_state_dir(self.state_key) / f"checkpoints-{self.workers[0]}-{self.workers[-1]}"
        return folder / f"{iteration}.pt"

    def checkpoint(self, iteration: int) -> None:
        """Keep the workers' state as it is after ``iteration`` (a named run's checkpoint), so
        that a resumed run continues from exactly it. Written atomically; the previous one is
        kept too (the server may have been stopped before writing its own checkpoint of this
        iteration), older ones are deleted."""
        path = self._checkpoint_path(iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"iteration": iteration, "states": [e.state_dict() for e in self._estimators()]}, tmp)
        tmp.replace(path)
        kept = sorted((p for p in path.parent.glob("*.pt")), key=lambda p: int(p.stem))
        for old in kept[:-2]:
            old.unlink(missing_ok=True)

    def restore(self, iteration: int) -> bool:
        """Put back the workers' state of ``iteration``'s checkpoint; False (and the state is
        rebuilt at the next step) when this node has none for that iteration."""
        path = self._checkpoint_path(iteration)
        if not path.exists():
            self.rebuild()
            return False
        saved = torch.load(path, weights_only=False)
        for estimator, state in zip(self._estimators(), saved["states"], strict=True):
            estimator.load_state_dict(state)
        return True

    def rebuild(self) -> None:
        """Forget the workers' state: the next step rebuilds it at the current model (SAGA's
        table and average recomputed, SVRG's snapshot retaken, SARAH restarted)."""
        for estimator in self._estimators():
            estimator.reset()

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
