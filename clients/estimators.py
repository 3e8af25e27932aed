"""Honest gradient estimators: SGD, mini-batch SGD, SAGA, SVRG and SARAH.

An estimator serves a group of workers at once (one worker per SuperNode, a node's share, or all
honest workers in the in-process engine): ``step(x, t)`` returns their (k, d) messages for
iteration t. A step is ``prepare(x, t)`` (host-side decisions: table fills, snapshots, restarts,
the iteration's sampling base written into a device tensor) then ``compute(x)`` (the math alone,
reading only tensors, with no host round-trip); when ``prepare`` says so, ``compute`` is a fixed
sequence of kernels that a CUDA graph can capture once and replay. Like a torch optimizer it
keeps an explicit state (``state_dict``), held in tensors that an allocator provides, e.g.
memory-mapped files that outlive the process. Sampling is a
pure function of (seed, worker id, iteration), and weight decay lambda * x is added exactly to
every message (the variance-reduced corrections apply to the data term only).

The registry: ``ESTIMATORS`` maps each estimator's ``name`` (the run config's ``optimizer``) to
its class, which states its default step size and batch size and, in ``options``, the run-config
keys of its own constructor arguments (``{key: (argument, meaning, constraints)}``, defaults the
constructor's). Adding an estimator is one class here, added to ``ESTIMATORS``, and a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from clients.gradients import ModelGradients, SampleGrads
from clients.rng import derive_seed, draw_base, uniform_ints_at
from clients.workers import CHUNK, SAMPLE_BLOCK, Chunk, WorkerData, chunks, take

Allocator = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]
_AHEAD, _AHEAD_DRAWS = 256, 1 << 16  # sample draws made ahead on the CPU: iterations, draws at most
_NO_ROWS = torch.zeros(0, 0, 0, dtype=torch.int64)
#: the registry's option format: run-config key -> (constructor argument, meaning, constraints)
Options = dict[str, tuple[str, str, dict]]


def memory_allocator(device: torch.device | str = "cpu") -> Allocator:
    """State in ordinary zero-filled tensors on ``device``."""

    def allocate(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return allocate


class Estimator:
    """Base class: sampling, chunked per-worker gradients and the state dictionary."""

    name = "estimator"
    default_lr: ClassVar[float] = 0.1  # the paper's step size for this estimator
    default_batch_size: ClassVar[int] = 1
    options: ClassVar[Options] = {}

    def __init__(
        self,
        grads: ModelGradients,
        data: WorkerData,
        *,
        batch_size: int,
        weight_decay: float = 0.0,
        seed: int = 0,
        allocate: Allocator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.grads = grads
        self.data = data
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self._allocate = allocate or memory_allocator(data.device)
        self._chunks = [c.to(data.device) for c in chunks(data.worker_ids.cpu())]
        self._sample_seed = derive_seed(self.seed, "sample")
        self._base = torch.zeros((), dtype=torch.int64, device=data.device)  # this iteration's draw base
        self._iteration = 0
        # On the CPU the draws are made ahead for blocks of iterations: (first iteration, draws);
        # on a GPU per iteration from ``_base``, inside the step's (graphable) kernels.
        self._ahead: tuple[int, torch.Tensor] | None = (0, _NO_ROWS) if data.device.type == "cpu" else None
        self.state: dict[str, torch.Tensor] = {}
        self._add_state("step", (1,), torch.int64, host=True)

    # -- state --------------------------------------------------------------------------------
    def _add_state(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None, host: bool = False
    ) -> torch.Tensor:
        """Allocate a state tensor; ``host``: a counter the host decides with, kept on the CPU so
        that reading it never waits for the device."""
        t = self._allocate(name, tuple(int(s) for s in shape), dtype or self.grads.dtype)
        if host and t.device.type != "cpu":
            t = torch.zeros(t.shape, dtype=t.dtype)
        self.state[name] = t
        return t

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The estimator's whole state (tensors; copies are safe to keep)."""
        return {k: v.detach().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        for k, v in self.state.items():
            v.copy_(state[k])

    @property
    def num_workers(self) -> int:
        return self.data.num_workers

    @property
    def last_iteration(self) -> int:
        """The last iteration this estimator stepped (0 before the first step)."""
        return int(self.state["step"].numpy()[0])  # a host counter (see _add_state)

    def reset(self) -> None:
        """Forget the state: the next step rebuilds it at its point (tables, snapshots, restarts)."""
        self.state["step"].zero_()

    # -- one step ------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, iteration: int) -> torch.Tensor:
        """The workers' (k, d) messages at the point x (d,) for iteration >= 1."""
        self.prepare(x, iteration)
        out = self.compute(x)
        self.state["step"].fill_(iteration)
        return out

    def prepare(self, x: torch.Tensor, iteration: int) -> bool:
        """Host-side work before ``iteration``'s math. Returns True when ``compute`` is then a fixed
        sequence of kernels (no host value, no data-dependent shape): capturable in a CUDA graph."""
        self._iteration = iteration
        if self._ahead is None:
            self._base.fill_(draw_base(self._sample_seed, iteration))
        return True

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The (k, d) messages at x for the prepared iteration."""
        raise NotImplementedError

    # -- sampling and gradients --------------------------------------------------------------
    def sample_rows(self, iteration: int | None = None) -> torch.Tensor:
        """(k, batch_size) rows of ``data`` drawn uniformly, with replacement, per worker, for
        ``iteration`` (None: the prepared one)."""
        if self._ahead is not None:
            return self._rows_ahead(self._iteration if iteration is None else iteration)
        if iteration is not None:
            self._base.fill_(draw_base(self._sample_seed, iteration))
        local = uniform_ints_at(self._base, self.data.worker_ids, self.batch_size, self.data.sizes)
        return local + self.data.offsets[:-1, None]

    def _rows_ahead(self, iteration: int) -> torch.Tensor:
        """``sample_rows(iteration)`` from draws made for a block of iterations at once (the same
        numbers: the draws are a pure function of the iteration), so that a small model's step
        does not pay the generator's dozen kernel calls every iteration."""
        first, rows = self._ahead
        if not first <= iteration < first + rows.shape[0]:
            block = max(1, min(_AHEAD, _AHEAD_DRAWS // (self.num_workers * self.batch_size)))
            bases = [draw_base(self._sample_seed, t) for t in range(iteration, iteration + block)]
            base = torch.tensor(bases, dtype=torch.int64, device=self.data.device)[:, None]
            local = uniform_ints_at(base, self.data.worker_ids, self.batch_size, self.data.sizes)
            self._ahead = first, rows = iteration, local + self.data.offsets[:-1, None]
        return rows[iteration - first]

    def _samples(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of ``rows`` (any shape), flattened to one sample per row."""
        flat = rows.reshape(-1)
        return self.data.input_rows(flat), take(self.data.targets, flat)

    def _chunk_grads(self, x: torch.Tensor, rows: torch.Tensor) -> SampleGrads:
        return self.grads.sample_grads(x, *self._samples(rows))

    @staticmethod
    def _write(out: torch.Tensor, ch: Chunk, fill: Callable[[torch.Tensor | None], torch.Tensor]) -> None:
        """Write a chunk's (CHUNK, d) group sums into its workers' rows of ``out`` (k, d);
        ``fill(view)`` computes them into ``view`` (None: a fresh block, for padded chunks)."""
        if ch.span is not None:
            fill(out[ch.span[0] : ch.span[1]])
            return
        out.index_copy_(0, ch.targets, fill(None).index_select(0, ch.slots))

    def _difference(self, x_new: torch.Tensor, x_old: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(k, d): per worker, mean over its sampled rows of grad f(x_new) - grad f(x_old)."""
        out = torch.empty(self.num_workers, self.grads.dim, dtype=self.grads.dtype, device=x_new.device)
        w = torch.full((CHUNK, self.batch_size), 1.0 / self.batch_size, dtype=self.grads.dtype, device=x_new.device)
        for ch in self._chunks:
            inputs, targets = self._samples(take(rows, ch.rows))  # gathered once for both points
            self._write(
                out, ch, lambda o, i=inputs, t=targets: self.grads.group_grad_differences(x_new, x_old, i, t, w, out=o)
            )
        return out

    def _mean_grads(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(k, d): per worker, the mean gradient over its sampled rows."""
        out = torch.empty(self.num_workers, self.grads.dim, dtype=self.grads.dtype, device=x.device)
        w = torch.full((CHUNK, self.batch_size), 1.0 / self.batch_size, dtype=self.grads.dtype, device=x.device)
        for ch in self._chunks:
            inputs, targets = self._samples(take(rows, ch.rows))
            self._write(out, ch, lambda o, i=inputs, t=targets: self.grads.group_grads(x, i, t, w, out=o))
        return out

    def full_gradients(
        self, x: torch.Tensor, store: Callable[[torch.Tensor, SampleGrads], None] | None = None
    ) -> torch.Tensor:
        """(k, d): each worker's full local gradient (mean over all its samples) at x.

        Computed per worker in blocks of SAMPLE_BLOCK samples (``store`` sees each block's
        per-sample gradients), so a worker's result never depends on its group or on threads.
        """
        out = torch.empty(self.num_workers, self.grads.dim, dtype=self.grads.dtype, device=x.device)
        for i in range(self.num_workers):
            start, end = int(self.data.offsets[i]), int(self.data.offsets[i + 1])
            acc = torch.zeros(self.grads.dim, dtype=self.grads.dtype, device=x.device)
            for s in range(start, end, SAMPLE_BLOCK):
                rows = torch.arange(s, min(s + SAMPLE_BLOCK, end), device=x.device)
                weights = torch.full((rows.numel(),), 1.0 / (end - start), dtype=self.grads.dtype, device=x.device)
                if store is None:  # sums only: no per-sample rows of dense parameters
                    acc += self.grads.weighted_sum_at(x, *self._samples(rows), weights)
                    continue
                sg = self._chunk_grads(x, rows)
                store(rows, sg)
                acc += self.grads.weighted_sum(sg, weights)
            out[i] = acc
        return out

    def _finish(self, messages: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.weight_decay:
            messages += self.weight_decay * x
        return messages


class SGD(Estimator):
    """Mean gradient over ``batch_size`` samples drawn with replacement (mini-batch SGD when large)."""

    name = "sgd"
    default_batch_size = 5

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self._mean_grads(x, self.sample_rows()), x)


class BatchSGD(SGD):
    """Mini-batch SGD: SGD with the paper's larger batch (50) and step size (0.5)."""

    name = "batch-sgd"
    default_lr = 0.5
    default_batch_size = 50


class SAGA(Estimator):
    """SAGA: a table of one stored gradient per local sample, filled at the first point.

    Message: mean_j [grad f_j(x) - phi_j] + gbar over the sampled j, then phi_j = grad f_j(x)
    and gbar (the table's average) is updated exactly. The table keeps each Linear layer's
    per-sample gradient as its two factors (and skips the input factor when it is the data
    itself), so the paper's MNIST setup needs ~26 MB instead of 9.5 GB.
    """

    name = "saga"

    def __init__(self, grads: ModelGradients, data: WorkerData, **kwargs) -> None:
        kwargs.setdefault("batch_size", 1)
        super().__init__(grads, data, **kwargs)
        n = data.num_rows
        self._store_input = [not d for d in grads.input_is_data]
        for i, f in enumerate(grads._factored):
            self._add_state(f"table.delta{i}", (n, f.out_features))
            if self._store_input[i]:
                self._add_state(f"table.input{i}", (n, f.in_features))
        if grads.dense_dim:
            self._add_state("table.dense", (n, grads.dense_dim))
        self._add_state("gbar", (data.num_workers, grads.dim))
        self._sample_index = [ch.sample_index(self.batch_size) for ch in self._chunks]

    def _table_rows(self, rows: torch.Tensor, fresh: SampleGrads) -> SampleGrads:
        """The stored per-sample gradients of ``rows``; ``fresh``: the same rows' new gradients,
        whose inputs a layer fed the data shares (not stored, not gathered twice)."""
        dev = self.data.device
        srows = rows.to(self.state["gbar"].device)
        inputs = []
        for i, store in enumerate(self._store_input):
            if store:
                inputs.append(take(self.state[f"table.input{i}"], srows).to(dev))
            else:
                inputs.append(fresh.inputs[i])
        deltas = [take(self.state[f"table.delta{i}"], srows).to(dev) for i in range(len(self._store_input))]
        dense = take(self.state["table.dense"], srows).to(dev) if "table.dense" in self.state else None
        return SampleGrads(inputs, deltas, dense)

    def _store_rows(self, rows: torch.Tensor, grads: SampleGrads) -> None:
        srows = rows.to(self.state["gbar"].device)
        for i, store in enumerate(self._store_input):
            self.state[f"table.delta{i}"][srows] = grads.deltas[i].to(srows.device)
            if store:
                self.state[f"table.input{i}"][srows] = grads.inputs[i].to(srows.device)
        if grads.dense is not None:
            self.state["table.dense"][srows] = grads.dense.to(srows.device)

    def _fill_table(self, x: torch.Tensor) -> None:
        self.state["gbar"].copy_(self.full_gradients(x, store=self._store_rows))

    def prepare(self, x: torch.Tensor, iteration: int) -> bool:
        if self.last_iteration == 0:
            self._fill_table(x)
        super().prepare(x, iteration)
        return self.batch_size == 1  # b > 1 fixes repeated draws exactly, which depends on the draws

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.sample_rows()
        b = self.batch_size
        sizes = self.data.sizes.to(x.device, self.grads.dtype)
        w = torch.full((CHUNK, b), 1.0 / b, dtype=self.grads.dtype, device=x.device)
        delta = torch.empty(self.num_workers, self.grads.dim, dtype=self.grads.dtype, device=x.device)
        exact: dict[int, torch.Tensor] = {}
        for ch, samples in zip(self._chunks, self._sample_index, strict=True):
            r = take(rows, ch.rows)
            new = self._chunk_grads(x, r)
            old = self._table_rows(r.reshape(-1), new)
            # (1/b) sum_j (new_j - old_j)
            self._write(delta, ch, lambda o, n=new, p=old: self.grads.combine_difference(n, p, w, out=o))
            # gbar += (1/J) sum over the distinct sampled j of (new_j - old_j), which is
            # (b/J) * delta unless a worker drew a sample twice: such workers get the exact sum.
            first = _first_occurrence(r) if b > 1 else None
            repeated = ~first.all(dim=1) & ch.valid if first is not None else None
            if repeated is not None and bool(repeated.any()):
                u = first.to(self.grads.dtype) / sizes[ch.rows][:, None]
                update = self.grads.combine_difference(new, old, u)
                for slot in repeated.nonzero().reshape(-1).tolist():
                    exact[int(ch.rows[slot])] = update[slot]
            self._store_rows(r.index_select(0, ch.slots).reshape(-1), new.select(samples))
        gbar = self.state["gbar"].to(x.device)
        fixed = list(exact)
        before = gbar[fixed].clone() if fixed else None
        out = delta.add_(gbar)  # the messages' data term, in delta's memory
        # gbar + (b/J) * delta  ==  gbar + (b/J) * (out - gbar): one fused pass
        gbar.lerp_(out, (b / sizes)[:, None])
        if fixed:
            gbar[fixed] = before + torch.stack([exact[i] for i in fixed])
        if gbar.data_ptr() != self.state["gbar"].data_ptr():
            self.state["gbar"].copy_(gbar)
        return self._finish(out, x)


class SVRG(Estimator):
    """SVRG: every ``snapshot_interval`` iterations (from the first) a snapshot x~ and each
    worker's full local gradient mu at it; in between grad f(x) - grad f(x~) + mu."""

    name = "svrg"
    options: ClassVar[Options] = {
        "snapshot-interval": (
            "snapshot_interval",
            "iterations between snapshots (full local gradients).",
            {"positive": True},
        )
    }

    def __init__(self, grads: ModelGradients, data: WorkerData, *, snapshot_interval: int = 100, **kwargs) -> None:
        kwargs.setdefault("batch_size", 1)
        super().__init__(grads, data, **kwargs)
        if snapshot_interval < 1:
            raise ValueError(f"snapshot_interval must be >= 1, got {snapshot_interval}")
        self.snapshot_interval = int(snapshot_interval)
        self._add_state("snapshot", (grads.dim,))
        self._add_state("mu", (data.num_workers, grads.dim))

    def prepare(self, x: torch.Tensor, iteration: int) -> bool:
        if self.last_iteration == 0 or (iteration - 1) % self.snapshot_interval == 0:
            self.state["snapshot"].copy_(x)
            self.state["mu"].copy_(self.full_gradients(x))
        return super().prepare(x, iteration)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        snapshot = self.state["snapshot"].to(x.device)
        out = self._difference(x, snapshot, self.sample_rows())
        out += self.state["mu"].to(x.device)
        return self._finish(out, x)


class SARAH(Estimator):
    """SARAH: at a restart v = full local gradient; otherwise v += grad f(x_t) - grad f(x_{t-1}).

    Restarts are common to all workers: the next one comes ``1..restart_interval - 1``
    iterations later, drawn from the run's seed (``restart='random'``, the paper's rule), or
    exactly ``restart_interval`` later (``restart='fixed'``).
    """

    name = "sarah"
    RESTARTS = ("random", "fixed")
    options: ClassVar[Options] = {
        "sarah-interval": (
            "restart_interval",
            "T; the next restart comes 1..T-1 iterations later (or exactly T).",
            {"positive": True},
        ),
        "sarah-restart": (
            "restart",
            "random (the paper's rule, seeded) or fixed (every sarah-interval).",
            {"choices": RESTARTS},
        ),
    }

    def __init__(
        self,
        grads: ModelGradients,
        data: WorkerData,
        *,
        restart_interval: int = 100,
        restart: str = "random",
        **kwargs,
    ) -> None:
        kwargs.setdefault("batch_size", 1)
        super().__init__(grads, data, **kwargs)
        if restart not in self.RESTARTS:
            raise ValueError(f"restart={restart!r} is not valid; choose one of: {', '.join(self.RESTARTS)}")
        if restart_interval < (2 if restart == "random" else 1):
            raise ValueError(
                f"restart_interval must be >= {2 if restart == 'random' else 1} for restart={restart!r}, "
                f"got {restart_interval}"
            )
        self.restart_interval = int(restart_interval)
        self.restart = restart
        self._add_state("v", (data.num_workers, grads.dim))
        self._add_state("previous", (grads.dim,))
        self._add_state("next_restart", (1,), torch.int64, host=True)
        self._restarting = False

    def next_restart_after(self, iteration: int) -> int:
        """The iteration of the restart that follows one at ``iteration``."""
        if self.restart == "fixed":
            return iteration + self.restart_interval
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "sarah-restart", iteration))
        return iteration + int(torch.randint(1, self.restart_interval, (1,), generator=gen))

    def prepare(self, x: torch.Tensor, iteration: int) -> bool:
        self._restarting = self.last_iteration == 0 or iteration >= int(self.state["next_restart"].numpy()[0])
        if self._restarting:
            self.state["next_restart"].fill_(self.next_restart_after(iteration))
        super().prepare(x, iteration)
        return not self._restarting  # a restart's full gradients loop over the workers

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        if self._restarting:
            v = self.full_gradients(x)
        else:
            previous = self.state["previous"].to(x.device)
            v = self.state["v"].to(x.device) + self._difference(x, previous, self.sample_rows())
        self.state["v"].copy_(v)
        self.state["previous"].copy_(x)
        return self._finish(v, x)


def _first_occurrence(rows: torch.Tensor) -> torch.Tensor:
    """(c, b) bool: True where rows[i, j] does not appear earlier in row i."""
    same = rows[:, :, None] == rows[:, None, :]
    earlier = torch.ones(rows.shape[1], rows.shape[1], dtype=torch.bool, device=rows.device).tril(-1)
    return ~(same & earlier).any(dim=2)


class Momentum(Estimator):
    """Worker momentum (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021): each worker sends m_t = beta * m_(t-1) + (1 - beta) * g_t, g_t its
    mini-batch gradient (with weight decay) at x_t, and m_1 = g_1. Averaging over time shrinks the
    honest messages' spread, which is what robust rules need; it is not variance reduction in
    SAGA's sense (the bias of the stale terms stays)."""

    name = "momentum"
    default_batch_size = 5
    options: ClassVar[Options] = {
        "momentum-beta": ("beta", "worker momentum's weight on the past (0 = SGD).", {"minimum": 0.0, "maximum": 0.999})
    }

    def __init__(self, grads: ModelGradients, data: WorkerData, *, beta: float = 0.9, **kwargs) -> None:
        super().__init__(grads, data, **kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self._add_state("momentum", (data.num_workers, grads.dim))
        self._first = True

    def prepare(self, x: torch.Tensor, iteration: int) -> bool:
        super().prepare(x, iteration)
        self._first = self.last_iteration == 0
        return not self._first

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        g = self._finish(self._mean_grads(x, self.sample_rows()), x)
        m = self.state["momentum"]
        if self._first:
            m.copy_(g)
        else:
            m.mul_(self.beta).add_(g, alpha=1.0 - self.beta)
        return m.clone()


ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in (SGD, BatchSGD, SAGA, SVRG, SARAH, Momentum)}
