"""Loss gradients of any torch model at a flat parameter vector, per sample and per worker.

A per-sample gradient of an ``nn.Linear`` layer is the outer product of the layer's output
gradient and its input, so it is kept as those two factors (``SampleGrads``): exact, and a
fraction of the dense size. Parameters of other layers get dense per-sample rows through
``torch.func``, or, where only weighted sums per group of samples are needed (SGD, mini-batch
SGD, SVRG, SARAH, momentum: ``group_grads``), one gradient per group of the group's weighted loss,
so that no (samples, d_dense) block is formed. The model must treat samples independently (no
BatchNorm in training mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[..., torch.Tensor]
_BLOCK = 32  # samples per partial sum in ``weighted_sum``


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on logits (the model outputs logits, no softmax)."""
    return nn.functional.cross_entropy(logits, target, reduction=reduction)


@dataclass
class _Factored:
    module: str  # dotted path of the nn.Linear
    weight: str  # parameter names
    bias: str | None
    in_features: int
    out_features: int
    weight_offset: int
    bias_offset: int


@dataclass
class SampleGrads:
    """Per-sample gradients of n samples in factored form.

    ``inputs[l]``: (n, in_l) inputs of factored layer l; ``deltas[l]``: (n, out_l) loss
    gradients at its output; ``dense``: (n, d_dense) gradients of the other parameters (or
    None when every parameter is factored). Sample s's gradient of layer l's weight is
    ``outer(deltas[l][s], inputs[l][s])`` and of its bias ``deltas[l][s]``.
    """

    inputs: list[torch.Tensor]
    deltas: list[torch.Tensor]
    dense: torch.Tensor | None

    def select(self, index: torch.Tensor) -> SampleGrads:
        """The rows ``index`` (a (m,) int64 tensor)."""
        return SampleGrads(
            [a.index_select(0, index) for a in self.inputs],
            [g.index_select(0, index) for g in self.deltas],
            None if self.dense is None else self.dense.index_select(0, index),
        )


class ModelGradients:
    """Gradients of ``loss(model(X), y)`` at flat points x of shape (d,).

    Parameters are flattened in ``model.named_parameters()`` order, each row-major, so a
    Linear weight's (out, in) gradient is one contiguous block of the flat vector.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], loss: LossFn = cross_entropy) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.loss = loss
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        numels = [p.numel() for _, p in named]
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        self.dim = sum(numels)
        self.dtype = named[0][1].dtype
        offset_of = dict(zip(self.names, self.offsets, strict=True))

        self._factored: list[_Factored] = []
        for path, module in model.named_modules():
            if type(module) is nn.Linear:
                prefix = f"{path}." if path else ""
                bias = f"{prefix}bias" if module.bias is not None else None
                self._factored.append(
                    _Factored(
                        path,
                        f"{prefix}weight",
                        bias,
                        module.in_features,
                        module.out_features,
                        offset_of[f"{prefix}weight"],
                        offset_of[bias] if bias else -1,
                    )
                )
        self._recording = False
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hooks = [
            model.get_submodule(f.module).register_forward_hook(self._make_hook(f.module)) for f in self._factored
        ]
        self._probe()
        factored_names = {f.weight for f in self._factored} | {f.bias for f in self._factored if f.bias}
        self.dense_names = [n for n in self.names if n not in factored_names]
        # On the parameters' device: a host index into a device tensor is a copy at every call,
        # which a CUDA graph's capture refuses (conv nets then ran eagerly on GPUs).
        device = named[0][1].device
        dense_cols = [
            torch.arange(offset_of[n], offset_of[n] + numels[self.names.index(n)], device=device)
            for n in self.dense_names
        ]
        self.dense_index = torch.cat(dense_cols) if dense_cols else torch.zeros(0, dtype=torch.long, device=device)
        self.dense_dim = int(self.dense_index.numel())

    # -- layout -------------------------------------------------------------------------------
    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """A (d,) vector from a name -> tensor mapping."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the flat vector x, shaped like the model's parameters."""
        return {n: x[o : o + _numel(s)].view(s) for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)}

    def initial_point(self) -> torch.Tensor:
        """The model's current parameters as a flat vector."""
        return self.flatten({n: p.detach() for n, p in self.model.named_parameters()})

    @property
    def input_is_data(self) -> list[bool]:
        """Per factored layer: True when its input is the (flattened) model input itself."""
        return list(self._input_is_data)

    # -- hooks --------------------------------------------------------------------------------
    def _make_hook(self, path: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._recording:
                self._records.setdefault(path, []).append((args[0], output))

        return hook

    def _probe(self) -> None:
        """Find Linear layers whose per-sample gradient is really an outer product, and whether the
        model is one such layer on the data with cross-entropy on its outputs (``_closed_form``)."""
        device = next(self.model.parameters()).device
        x = torch.zeros(2, *self.input_shape, dtype=self.dtype, device=device)
        self._records = {}
        self._recording = True
        try:
            with torch.no_grad():
                out = self.model(x)
        finally:
            self._recording = False
        keep, input_is_data, outputs = [], [], []
        for f in self._factored:
            calls = self._records.get(f.module, [])
            # A layer used twice, or applied to more than (batch, features), has a per-sample
            # gradient that is a sum of outer products: it stays dense.
            if len(calls) == 1 and calls[0][0].dim() == 2:
                keep.append(f)
                inp = calls[0][0]
                input_is_data.append(inp.data_ptr() == x.data_ptr() and inp.numel() == x.numel())
                outputs.append(calls[0][1])
        self._records = {}
        self._factored = keep
        self._input_is_data = input_is_data
        # The model is one Linear layer on the data whose output it returns, trained with
        # cross-entropy (logistic regression): the output gradient is softmax - one-hot, no autograd.
        self._closed_form = (
            len(keep) == 1
            and input_is_data[0]
            and self.loss is cross_entropy
            and hasattr(torch.ops.aten, "_log_softmax_backward_data")  # autograd's kernel (see _sample_grads)
            and len(self.names) == (2 if keep[0].bias else 1)
            and outputs[0].data_ptr() == out.data_ptr()
            and outputs[0].shape == out.shape
            and self._linear_is_the_model(device)
        )

    def _linear_is_the_model(self, device: torch.device) -> bool:
        """Whether the model's outputs on random inputs are exactly its one Linear layer's (nothing
        done to them in place after the layer)."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, *self.input_shape, generator=gen, dtype=self.dtype).to(device)
        with torch.no_grad():
            return bool(torch.equal(self.model(x), self._logits(self.initial_point(), x)))

    def _logits(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(n, classes) outputs of the closed-form model (one Linear layer) at x."""
        f = self._factored[0]
        weight = x[f.weight_offset : f.weight_offset + f.out_features * f.in_features].view(f.out_features, -1)
        flat = inputs.reshape(inputs.shape[0], -1)
        if f.bias is None:
            return flat @ weight.T
        return torch.addmm(x[f.bias_offset : f.bias_offset + f.out_features], flat, weight.T)

    # -- gradients ----------------------------------------------------------------------------
    def sample_grads(
        self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, dense: bool = True
    ) -> SampleGrads:
        """Per-sample gradients of the loss of each of n samples at x.

        Args:
            x: (d,) parameters.
            inputs: (n, *input_shape) samples.
            targets: (n,) targets.
            dense: False leaves the dense parameters' rows out (``SampleGrads.dense`` None), for a
                caller that gets their group sums from ``dense_group_sums``.
        """
        if self.dense_dim:
            # Convolution kernels and the like split their sums differently with the thread
            # count; one thread keeps every worker's numbers independent of its host.
            with _one_thread():
                return self._sample_grads(x, inputs, targets, dense)
        return self._sample_grads(x, inputs, targets, dense)

    def _sample_grads(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, dense: bool) -> SampleGrads:
        if self._closed_form:
            # d(sum of cross-entropies)/d(logits) = softmax - one-hot, by the very kernel autograd
            # would call (so the numbers are autograd's, bit for bit), without autograd's overhead
            log_p = torch.log_softmax(self._logits(x.detach(), inputs), dim=1)
            minus_one_hot = torch.zeros_like(log_p).scatter_(1, targets.view(-1, 1), -1.0)
            delta = torch.ops.aten._log_softmax_backward_data(minus_one_hot, log_p, 1, log_p.dtype)
            return SampleGrads([inputs.reshape(inputs.shape[0], -1)], [delta], None)
        if not self._factored and not dense:  # nothing factored to record
            return SampleGrads([], [], None)
        leaf = x.detach().requires_grad_(self.dense_dim < self.dim)
        params = self.unflatten(leaf)
        self._records = {}
        self._recording = bool(self._factored)
        try:
            with torch.enable_grad():
                out = functional_call(self.model, params, (inputs,))
                losses = self.loss(out, targets, reduction="sum")
                records = [self._records[f.module][0] for f in self._factored]
                self._recording = False
                outputs = [o for _, o in records]
                # Some CPU kernels sum in an order set by the thread count (softmax's backward, which
                # mlp-notebook's double softmax runs): the backward to the layers' outputs is small
                # work, so it runs on one thread; the forward's products keep the threads.
                with _one_thread():
                    deltas = list(torch.autograd.grad(losses, outputs)) if outputs else []
        finally:
            self._recording = False
            self._records = {}
        acts = [a.detach() for a, _ in records]
        rows = self._dense_sample_grads(x, inputs, targets) if self.dense_dim and dense else None
        return SampleGrads(acts, [g.detach() for g in deltas], rows)

    def _dense_sample_grads(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        params = {n: t.detach() for n, t in self.unflatten(x).items()}
        dense = {n: params.pop(n) for n in self.dense_names}

        def one(dense_params: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, {**params, **dense_params}, (xi.unsqueeze(0),))
            return self.loss(out, yi.unsqueeze(0), reduction="sum")

        rows = vmap(grad(one), in_dims=(None, 0, 0))(dense, inputs, targets)
        return torch.cat([rows[n].reshape(inputs.shape[0], -1) for n in self.dense_names], dim=1)

    def dense_group_sums(
        self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """(c, d_dense): row i is sum_j weights[i, j] * the dense parameters' gradient of sample
        (i, j), as ``combine`` forms it from per-sample rows, but as one gradient of the group's
        weighted loss: convolutions then sum over the group's samples inside their own backward
        (on 2 CPU cores 1.2x faster for the small cnn, 3.8x for ResNet-18 with 5 samples per worker:
        ``benchmarks/group_gradients.py``) and nothing of size (c * b, d_dense) is formed
        (ResNet-18, 25 workers x 50 samples: 56 GB of rows).
        The groups are vmapped at a fixed shape (the estimators' chunks), on one thread, so a
        worker's numbers do not depend on its group or host.

        Args:
            x: (d,) parameters.
            inputs: (c * b, *input_shape) samples, group-major.
            targets: (c * b,) targets.
            weights: (c, b) weight of each sample.
        """
        c, b = weights.shape
        params = {n: t.detach() for n, t in self.unflatten(x).items()}
        dense = {n: params.pop(n) for n in self.dense_names}

        def group(dense_params: dict, xg: torch.Tensor, yg: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, {**params, **dense_params}, (xg,))
            return (self.loss(out, yg, reduction="none") * wg).sum()

        grouped = inputs.reshape(c, b, *inputs.shape[1:])
        with _one_thread():
            rows = vmap(grad(group), in_dims=(None, 0, 0, 0))(
                dense, grouped, targets.reshape(c, b), weights.to(self.dtype)
            )
        return torch.cat([rows[n].reshape(c, -1) for n in self.dense_names], dim=1)

    def group_grads(
        self,
        x: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(c, d): row i is sum_j weights[i, j] * gradient of sample (i, j), for c * b samples
        group-major: ``combine(sample_grads(...), weights)``, the factored layers' part the same
        numbers, the dense parameters' part from ``dense_group_sums``."""
        out = self.combine(self.sample_grads(x, inputs, targets, dense=False), weights, out=out)
        if self.dense_dim:
            out[:, self.dense_index] = self.dense_group_sums(x, inputs, targets, weights)
        return out

    def group_grad_differences(
        self,
        x_new: torch.Tensor,
        x_old: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(c, d): row i is sum_j weights[i, j] * (gradient at x_new - gradient at x_old) of sample
        (i, j): ``combine_difference`` of the two points' ``sample_grads``, the dense parameters'
        part as the difference of the two points' ``dense_group_sums``."""
        new = self.sample_grads(x_new, inputs, targets, dense=False)
        old = self.sample_grads(x_old, inputs, targets, dense=False)
        out = self.combine_difference(new, old, weights, out=out)
        if self.dense_dim:
            out[:, self.dense_index] = self.dense_group_sums(x_new, inputs, targets, weights) - self.dense_group_sums(
                x_old, inputs, targets, weights
            )
        return out

    def combine(self, grads: SampleGrads, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sums of per-sample gradients within groups.

        Args:
            grads: per-sample gradients of c * b samples, group-major.
            weights: (c, b) weight of each sample.
            out: optional (c, d) tensor to write into.

        Returns:
            (c, d): row i is sum_j weights[i, j] * gradient of sample (i, j).
        """
        c, b = weights.shape
        if out is None:
            out = torch.empty(c, self.dim, dtype=self.dtype, device=weights.device)
        w = weights.to(self.dtype).unsqueeze(-1)
        for f, a, g in zip(self._factored, grads.inputs, grads.deltas, strict=True):
            _place_layer(out, f, g.reshape(c, b, -1) * w, a.reshape(c, b, -1))
        if grads.dense is not None:
            out[:, self.dense_index] = (grads.dense.reshape(c, b, -1) * w).sum(dim=1)
        return out

    def combine_difference(
        self, new: SampleGrads, old: SampleGrads, weights: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted sums of per-sample gradient differences within groups.

        Args:
            new, old: per-sample gradients of the same c * b samples (group-major) at two points.
            weights: (c, b) weight of each sample.
            out: optional (c, d) tensor to write into.

        Returns:
            (c, d): row i is sum_j weights[i, j] * (new - old gradient of sample (i, j)).

        A layer fed the data itself has the same input at both points, so its part is one
        outer product per sample, of the input and the difference of the output gradients:
        half the work of combining both sets (and that layer usually holds most parameters).
        """
        c, b = weights.shape
        if out is None:
            out = torch.empty(c, self.dim, dtype=self.dtype, device=weights.device)
        w = weights.to(self.dtype).unsqueeze(-1)
        layers = zip(self._factored, self._input_is_data, new.inputs, new.deltas, old.inputs, old.deltas, strict=True)
        for f, same_input, a, g, a_old, g_old in layers:
            if same_input:
                gw = (g - g_old).reshape(c, b, -1) * w
                a = a.reshape(c, b, -1)
            else:
                gw = torch.cat([g.reshape(c, b, -1) * w, g_old.reshape(c, b, -1) * -w], dim=1)
                a = torch.cat([a.reshape(c, b, -1), a_old.reshape(c, b, -1)], dim=1)
            _place_layer(out, f, gw, a)
        if new.dense is not None:
            out[:, self.dense_index] = ((new.dense - old.dense).reshape(c, b, -1) * w).sum(dim=1)
        return out

    def weighted_sum(self, grads: SampleGrads, weights: torch.Tensor) -> torch.Tensor:
        """(d,) sum_s weights[s] * gradient of sample s, for many samples.

        Summed as partial sums over blocks of ``_BLOCK`` samples, then the partials in order: a
        single large matrix product would let the BLAS split the sum over samples across threads,
        and the result would change with the thread count (a Ray actor gets 1 or 2 CPUs).
        """
        index, w = _blocks(weights)
        if index is not None:
            grads = grads.select(index)
        return self.combine(grads, w).sum(dim=0)

    def weighted_sum_at(
        self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``weighted_sum(sample_grads(x, inputs, targets), weights)`` without per-sample dense rows:
        the same blocks, each block's dense part from ``dense_group_sums``."""
        index, w = _blocks(weights)
        grads = self.sample_grads(x, inputs, targets, dense=False)  # the factored part as weighted_sum's
        if index is not None:
            grads = grads.select(index)
            inputs, targets = inputs.index_select(0, index), targets.index_select(0, index)
        out = self.combine(grads, w)
        if self.dense_dim:
            out[:, self.dense_index] = self.dense_group_sums(x, inputs, targets, w)
        return out.sum(dim=0)

    def mean_grad(self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(d,) gradient of the mean loss over the n samples, by plain autograd."""
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = functional_call(self.model, self.unflatten(leaf), (inputs,))
            (g,) = torch.autograd.grad(self.loss(out, targets), leaf)
        return g

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 10_000
    ) -> tuple[float, float]:
        """(mean loss, accuracy) of the model at x on the given samples."""
        params = self.unflatten(x)
        total_loss, correct = 0.0, 0
        for s in range(0, inputs.shape[0], batch):
            out = functional_call(self.model, params, (inputs[s : s + batch],))
            y = targets[s : s + batch]
            total_loss += float(self.loss(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
        n = max(int(inputs.shape[0]), 1)
        return total_loss / n, correct / n


def _blocks(weights: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(sample index padded to whole blocks of ``_BLOCK`` (None: no padding), (blocks, _BLOCK)
    weights with zeros on the padding)."""
    n = int(weights.numel())
    blocks = -(-n // _BLOCK)
    pad = blocks * _BLOCK - n
    w = weights.reshape(-1)
    if not pad:
        return None, w.reshape(blocks, _BLOCK)
    index = torch.cat([torch.arange(n, device=w.device), torch.zeros(pad, dtype=torch.long, device=w.device)])
    w = torch.cat([w, torch.zeros(pad, dtype=w.dtype, device=w.device)])
    return index, w.reshape(blocks, _BLOCK)


def _place_layer(out: torch.Tensor, f: _Factored, gw: torch.Tensor, a: torch.Tensor) -> None:
    """Write factored layer ``f``'s group sums into ``out`` (c, d): its weight block is
    sum_j outer(gw[:, j], a[:, j]) for weighted output gradients gw (c, k, out) and inputs a
    (c, k, in), its bias sum_j gw[:, j]."""
    size = f.out_features * f.in_features
    out[:, f.weight_offset : f.weight_offset + size] = torch.bmm(gw.transpose(1, 2), a).reshape(-1, size)
    if f.bias:
        out[:, f.bias_offset : f.bias_offset + f.out_features] = gw.sum(dim=1)


@contextlib.contextmanager
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
