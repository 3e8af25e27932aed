"""What a SuperNode does for the workers it hosts (no Flower here; the ClientApp adapts it)."""

from __future__ import annotations

from pathlib import Path

import torch

from byzflower.atomic import DAMAGED_TORCH, FOREIGN_STATE
from byzflower.config import RunConfig
from byzflower.factory import dataset_of, device_of, gradients_of, layout_of
from byzflower.flower.node_state import mapped_allocator, run_state_dir, state_key
from byzflower.workers import HostedWorkers
from clients.attacks import HonestStats


class NodeWorkers(HostedWorkers):
    """The workers of node ``partition_id`` of ``num_partitions`` for one run; their estimators'
    state lives in files shared by the node's ClientApp processes (one per message)."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int, run_id: int | str) -> None:
        self.cfg = cfg
        self.state_key = state_key(cfg, run_id) if isinstance(run_id, int) else run_id
        self.workers = list(layout_of(cfg).node_workers(partition_id, num_partitions))
        device = device_of(cfg)
        data = dataset_of(cfg)
        folder = run_state_dir(self.state_key)
        grads = gradients_of(cfg, data, device)
        super().__init__(cfg, self.workers, data, grads, device, lambda label: mapped_allocator(folder / label))

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
        torch.save({"iteration": iteration, "state": self.state_dict()}, tmp)
        tmp.replace(path)
        kept = sorted((p for p in path.parent.glob("*.pt")), key=lambda p: int(p.stem))
        for old in kept[:-2]:
            old.unlink(missing_ok=True)

    def restore(self, iteration: int) -> bool:
        """Put back the workers' state of ``iteration``'s checkpoint; False (and the state is
        rebuilt at the next step) when this node has none for that iteration."""
        path = self._checkpoint_path(iteration)
        try:
            saved = torch.load(path, weights_only=False) if path.exists() else None
        except DAMAGED_TORCH:
            saved = None  # damaged (a disk fault): as if this node had kept nothing
        if saved is not None:
            try:
                self.load_state_dict(saved["state"])
                return True
            except FOREIGN_STATE:
                pass  # a state this code cannot take (another version wrote it): kept nothing usable
        self.reset()
        return False

    def honest_messages(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """(len(honest), d) messages of the node's honest workers at x, on the host."""
        return self.honest_step(x, iteration).cpu()

    def byzantine_messages(self, x: torch.Tensor, iteration: int, stats: HonestStats | None) -> torch.Tensor:
        """(len(byzantine), d) messages of the node's Byzantine workers, on the host."""
        return self.byzantine_step(x, iteration, stats).cpu()
