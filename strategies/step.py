"""The server's step, shared by the Flower strategy and the in-process engine (no Flower here).

screened messages -> rule -> finite check -> x <- x - lr * aggregate. A round that cannot be
aggregated (too few valid messages, a rule error, a non-finite aggregate or step) leaves the
model unchanged and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from strategies import kernels
from strategies.aggregators import AggregationError, Rule


@dataclass
class StepOutcome:
    """The model after the step (the same tensor when the round failed) and what happened."""

    point: torch.Tensor
    aggregate: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
    failure: str | None = None  # why the round failed, None when the model moved
    reason: str = ""  # a short tag for the metrics: 'too-few', 'rule-error', 'nonfinite'
    weights: np.ndarray | None = None  # each aggregated row's share (Aggregate.weights), for detection

    @property
    def failed(self) -> bool:
        return self.failure is not None


def server_step(
    point: torch.Tensor, messages: torch.Tensor, rule: Rule, lr: float, workers: list[int] | None = None
) -> StepOutcome:
    """One aggregation and model step. ``messages`` (n, d) are already screened (finite rows);
    ``workers`` (n,) says which worker each row is, for the rules that need it (MoNNA's pivot)."""
    if messages.shape[0] < rule.min_messages():
        return StepOutcome(
            point,
            failure=f"{rule.name} needs at least {rule.min_messages()} valid messages, got {messages.shape[0]}",
            reason="too-few",
        )
    rule.label_rows(workers)  # a no-op for rules that need no worker ids
    try:
        result = rule(messages)
    except AggregationError as exc:
        return StepOutcome(point, failure=str(exc), reason="rule-error")
    if not kernels.all_finite(result.vector):
        return StepOutcome(
            point, info=result.info, failure=f"{rule.name} returned a non-finite aggregate", reason="nonfinite"
        )
    moved = point - lr * result.vector.to(point)
    if not kernels.all_finite(moved):
        return StepOutcome(
            point,
            info=result.info,
            failure=f"the step lr * aggregate overflows the model (lr={lr})",
            reason="nonfinite",
        )
    return StepOutcome(moved, result.vector, dict(result.info), weights=result.weights)


@dataclass
class SpeculativeOutcome:
    """A step taken without reading anything back: ``ok`` (a 0-d bool tensor on the device) says
    whether every message, the aggregate and the step were finite; the point moved only if so."""

    point: torch.Tensor
    aggregate: torch.Tensor
    ok: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)
    weights: np.ndarray | None = None


def speculative_step(
    point: torch.Tensor,
    messages: torch.Tensor,
    valid: torch.Tensor,
    rule: Rule,
    lr: float,
    workers: list[int] | None = None,
) -> SpeculativeOutcome | None:
    """``server_step`` on all (n, d) messages as if all were valid (``valid``: (n,) bool from
    ``finite_rows``), with no host round-trip of its own, so a GPU runs ahead of the host.

    When ``ok`` turns out False the caller must redo the round with ``server_step`` on the valid
    rows (the engine replays the segment). None: the rule refused the messages outright; run the
    exact step now.
    """
    if messages.shape[0] < rule.min_messages():
        return None
    rule.label_rows(workers)  # a no-op for rules that need no worker ids
    try:
        result = rule(messages)
    except Exception:
        return None
    moved = point - lr * result.vector.to(point)
    ok = valid.all() & torch.isfinite(moved).all()  # a non-finite aggregate makes the step non-finite
    return SpeculativeOutcome(torch.where(ok, moved, point), result.vector, ok, dict(result.info), result.weights)
