"""The honest workers' objective and its minimum, for the paper's convex experiments (Figs. 3-6).

F(x) = (1/H) sum_w f_w(x) + (lambda / 2) ||x||^2, f_w the mean loss over honest worker w's local
samples and lambda the run's ``weight-decay`` (each honest message carries lambda * x, so this is
the function the honest messages are gradients of). With ``model='logreg'`` and lambda > 0 it is
strongly convex: one minimiser x*, found once by full-batch L-BFGS in float64 and cached beside the
data set's partitions (keyed by the data, the split, the model and lambda). Evaluations then record
the optimality gap F(x_k) - F(x*), in float64 over every honest sample.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os

import numpy as np
import torch
from torch.func import functional_call

from byzflower.atomic import DAMAGED_TORCH, cache_file
from byzflower.config import RunConfig
from byzflower.data import ImageData, dataset_folder
from byzflower.models import build_model
from clients.gradients import ModelGradients

_SOLVE_TOL = 1e-7  # max |dF/dx_i| at x*, relative to its value at 0


class HonestObjective:
    """F over the honest workers' data (their partitions), in float64 on the CPU."""

    def __init__(self, cfg: RunConfig, data: ImageData, grads: ModelGradients, parts: tuple) -> None:
        self.grads = grads
        self.lam = float(cfg["weight-decay"])
        index = np.concatenate(parts)
        # each worker's samples weigh 1 / (H n_w): the mean of the workers' local means
        self.weights = torch.cat(
            [torch.full((len(p),), 1.0 / (len(parts) * len(p)), dtype=torch.float64) for p in parts]
        )
        if len(np.unique(index)) < len(index):  # workers share samples (partitioner='full'): each once
            index, inverse = np.unique(index, return_inverse=True)
            self.weights = torch.zeros(len(index), dtype=torch.float64).index_add_(
                0, torch.from_numpy(inverse), self.weights
            )
        self.inputs = data.inputs(data.train_images[index]).to(torch.float64)
        self.targets = torch.from_numpy(data.train_labels[index])
        # a fresh copy of the network in float64 (its own weights are never used: x replaces them)
        self.model = build_model(cfg["model"], int(cfg["seed"]), data.input_shape, data.spec.classes).double()
        digest = hashlib.sha256()
        for piece in (
            str(cfg["model"]),
            repr(self.lam),
            data.spec.name,
            index.tobytes(),
            self.weights.numpy().tobytes(),
        ):
            digest.update(piece.encode() if isinstance(piece, str) else piece)
        self.solved = False  # whether this instance ran the solver (False: read from the cache)
        self.stale = False  # whether a cached minimiser was found that is not this objective's
        self.cache = dataset_folder(cfg["dataset"], cfg["data-dir"]) / "optima" / f"{digest.hexdigest()[:20]}.pt"
        self.minimum = self._minimum()

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) as a 0-d float64 tensor (differentiable in x)."""
        params = self.grads.unflatten(x)
        logits = functional_call(self.model, params, (self.inputs,))
        losses = torch.nn.functional.cross_entropy(logits, self.targets, reduction="none")
        return (self.weights * losses).sum() + 0.5 * self.lam * (x * x).sum()

    def gap(self, x: torch.Tensor) -> float:
        """F(x) - F(x*) (>= 0 up to float64 rounding)."""
        with torch.no_grad():
            return float(self.value(x.detach().to("cpu", torch.float64))) - self.minimum

    def _cached(self) -> float | None:
        """The cached minimum; None when there is none, it is damaged, or it is not this objective's
        (then solved again).

        The cache is keyed by the model's name, lambda, the data set's name and the honest samples, not
        by the data's values or the model's code, so F at the cached x* must give the cached value back:
        a user's model edited under the same name or inputs preprocessed otherwise by another version
        would otherwise measure every gap from another problem's minimum (a folder data set saved again
        gets a cache folder of its own: its arrays are keyed by their contents)."""
        try:
            saved = torch.load(self.cache, weights_only=True) if self.cache.exists() else None
            if saved is None:
                return None
            value, x = float(saved["value"]), saved["x"]
        except (*DAMAGED_TORCH, KeyError, TypeError):  # (or not the dict this class saves)
            return None
        if not isinstance(x, torch.Tensor) or x.shape != (self.grads.dim,):
            self.stale = True
            return None
        with torch.no_grad():
            now = float(self.value(x.to(torch.float64)))
        if not math.isclose(now, value, rel_tol=1e-9, abs_tol=1e-12):
            self.stale = True
            return None
        return value

    def _minimum(self) -> float:
        if (cached := self._cached()) is not None:
            return cached
        # Runs of one sweep start together and share x*: one solves it, the others wait and read it.
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cache.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if (cached := self._cached()) is not None:
                return cached
            return self._solve()
        finally:
            os.close(fd)

    def _solve(self) -> float:
        self.solved = True
        x = torch.zeros(self.grads.dim, dtype=torch.float64, requires_grad=True)
        self.value(x).backward()
        start = float(x.grad.abs().max())
        opt = torch.optim.LBFGS(
            [x],
            lr=1.0,
            max_iter=5000,
            max_eval=10000,
            history_size=30,
            tolerance_grad=_SOLVE_TOL * start,  # max |dF/dx_i|, relative to the start's
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = self.value(x)
            value.backward()
            return value

        opt.step(closure)
        closure()
        value = float(self.value(x.detach()))
        solved = {"x": x.detach(), "value": torch.tensor(value, dtype=torch.float64), "grad_norm": float(x.grad.norm())}
        cache_file(self.cache, lambda tmp: torch.save(solved, tmp))  # unwritten: the run goes on with x*
        return value
