"""Workers, their roles, and which SuperNode hosts which of them.

W = H + B workers are numbered 0..W-1; the Byzantine ones are the last B. Node p of K hosts
the contiguous block [p*W//K, (p+1)*W//K): K == W is one worker per node (the deployment
picture), K < W gives each node a share. Honest worker w trains on data partition
``honest_rank(w)``; partitions are split over the honest workers only, so they do not change
with the attack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    num_honest: int
    byzantine_ids: tuple[int, ...] = ()

    @property
    def num_byzantine(self) -> int:
        return len(self.byzantine_ids)

    @property
    def num_workers(self) -> int:
        return self.num_honest + self.num_byzantine

    @classmethod
    def last(cls, num_honest: int, num_byzantine: int) -> Layout:
        """The default: Byzantine workers are the last ``num_byzantine``."""
        w = num_honest + num_byzantine
        return cls(num_honest, tuple(range(num_honest, w)))

    @property
    def honest_ids(self) -> tuple[int, ...]:
        byz = set(self.byzantine_ids)
        return tuple(w for w in range(self.num_workers) if w not in byz)

    def is_byzantine(self, worker: int) -> bool:
        return worker in self.byzantine_ids

    def honest_rank(self, worker: int) -> int:
        """The data partition of an honest worker (its rank among honest workers)."""
        return self.honest_ids.index(worker)

    def node_workers(self, partition_id: int, num_partitions: int) -> range:
        """Workers hosted by node ``partition_id`` of ``num_partitions``."""
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
        w = self.num_workers
        return range(partition_id * w // num_partitions, (partition_id + 1) * w // num_partitions)

    def split(self, workers: range | list[int]) -> tuple[list[int], list[int]]:
        """(honest, byzantine) among ``workers``."""
        honest = [w for w in workers if not self.is_byzantine(w)]
        return honest, [w for w in workers if self.is_byzantine(w)]
