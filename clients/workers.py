"""The local data of a group of workers, and the fixed-shape chunks their gradients are computed in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Workers are processed in blocks of CHUNK consecutive worker ids (padded at the edges), so a
# worker's gradient is always computed by the same kernels at the same position, whichever
# group, node or engine holds it: numbers are then bit-identical across groupings.
CHUNK = 25
# Full local gradients run over a worker's samples in blocks of this many (the same reason).
SAMPLE_BLOCK = 512


def take(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for int64 ``rows`` of any shape: (*rows.shape, *table.shape[1:]).

    The same values as advanced indexing, by ``index_select``: a quarter of its cost on a CPU for
    a small model's gathers (measured: 28 against 103 us for 125 MNIST images), paid every iteration."""
    if rows.dim() == 1:  # the common case, without the reshapes' own cost
        return table.index_select(0, rows)
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, *table.shape[1:])


@dataclass
class WorkerData:
    """Samples of k workers, concatenated.

    Attributes:
        worker_ids: (k,) int64 global worker ids, increasing.
        inputs: (N, *input_shape) all samples of the group, worker by worker; or, when ``source`` is
            given, each distinct sample once (workers sharing samples: partitioner='full').
        targets: (N,) int64 labels, one per row.
        offsets: (k + 1,) int64, worker i owns rows offsets[i]:offsets[i+1].
        source: None, or (N,) int64: row r's sample is ``inputs[source[r]]``.
    """

    worker_ids: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = int(self.worker_ids.numel())
        if self.offsets.numel() != k + 1:
            raise ValueError(f"offsets must have {k + 1} entries, got {self.offsets.numel()}")
        if k and bool((self.sizes < 1).any()):
            empty = self.worker_ids[self.sizes < 1].tolist()
            raise ValueError(f"workers {empty} have no samples")
        if k > 1 and bool((self.worker_ids[1:] <= self.worker_ids[:-1]).any()):
            raise ValueError("worker_ids must be strictly increasing")

    @classmethod
    def from_parts(cls, worker_ids: list[int], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> WorkerData:
        """Build from one (inputs, targets) pair per worker."""
        sizes = [int(y.shape[0]) for _, y in parts]
        offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
        return cls(
            torch.tensor(worker_ids, dtype=torch.int64),
            torch.cat([x for x, _ in parts]),
            torch.cat([y for _, y in parts]),
            offsets,
        )

    @classmethod
    def shared(
        cls, worker_ids: list[int], samples: torch.Tensor, labels: torch.Tensor, indices: list[torch.Tensor]
    ) -> WorkerData:
        """Workers whose rows are ``indices`` (one int64 array per worker) into the shared
        ``samples`` (M, ...) and ``labels`` (M,): each sample is stored once, however many hold it."""
        sizes = [int(i.numel()) for i in indices]
        source = torch.cat(indices)
        offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
        return cls(torch.tensor(worker_ids, dtype=torch.int64), samples, labels[source], offsets, source)

    @property
    def num_rows(self) -> int:
        """N, the rows of all the group's workers together."""
        return int(self.targets.shape[0])

    def input_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The inputs of ``rows`` (any shape of int64 row numbers), shaped (*rows.shape, *input_shape)."""
        return take(self.inputs, rows if self.source is None else take(self.source, rows))

    @property
    def num_workers(self) -> int:
        return int(self.worker_ids.numel())

    @property
    def sizes(self) -> torch.Tensor:
        """(k,) number of samples of each worker."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def to(self, device: torch.device | str) -> WorkerData:
        return WorkerData(
            self.worker_ids.to(device),
            self.inputs.to(device),
            self.targets.to(device),
            self.offsets.to(device),
            None if self.source is None else self.source.to(device),
        )

    def worker(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the group's i-th worker."""
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        inputs = self.inputs[s:e] if self.source is None else self.inputs[self.source[s:e]]
        return inputs, self.targets[s:e]


@dataclass(frozen=True)
class Chunk:
    """One block of CHUNK consecutive worker ids.

    Attributes:
        rows: (CHUNK,) group rows to compute (edge slots repeat a row of the chunk).
        valid: (CHUNK,) bool, True where the slot is one of the group's workers.
        targets: group rows the valid slots map to, in order.
        slots: (len(targets),) int64 indices of the valid slots (fixed-shape selections need no mask).
    """

    rows: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor
    span: tuple[int, int] | None = None  # (start, stop) when the slots are exactly rows start..stop-1

    def to(self, device: torch.device | str) -> Chunk:
        return Chunk(
            self.rows.to(device), self.valid.to(device), self.targets.to(device), self.slots.to(device), self.span
        )

    def sample_index(self, b: int) -> torch.Tensor:
        """Indices of the valid slots' samples in a slot-major (CHUNK * b) layout."""
        return (self.slots[:, None] * b + torch.arange(b, device=self.slots.device)).reshape(-1)


def chunks(worker_ids: torch.Tensor) -> Iterator[Chunk]:
    """The aligned chunks covering ``worker_ids`` (increasing global ids)."""
    ids = worker_ids.tolist()
    if not ids:
        return
    row_of = {w: i for i, w in enumerate(ids)}
    for block in sorted({w // CHUNK for w in ids}):
        slots = range(block * CHUNK, (block + 1) * CHUNK)
        present = [row_of[w] for w in slots if w in row_of]
        rows = [row_of.get(w, present[0]) for w in slots]
        full = len(present) == CHUNK and present == list(range(present[0], present[0] + CHUNK))
        yield Chunk(
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor([w in row_of for w in slots]),
            torch.tensor(present, dtype=torch.int64),
            torch.tensor([i for i, w in enumerate(slots) if w in row_of], dtype=torch.int64),
            (present[0], present[0] + CHUNK) if full else None,
        )
