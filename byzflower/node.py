"""What a SuperNode does for the workers it hosts (no Flower here; the ClientApp adapts it)."""

from __future__ import annotations

import torch

from byzflower.config import RunConfig
from byzflower.factory import dataset_of, device_of, gradients_of, layout_of, make_estimator, worker_data
from byzflower.node_state import mapped_allocator, run_state_dir


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

    def honest_messages(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """(len(honest), d) messages of the node's honest workers at x."""
        if self.estimator is None:
            return torch.zeros(0, self.grads.dim)
        return self.estimator.step(x.to(self.device), iteration).cpu()
