"""The server's step, shared by the Flower strategy and the in-process engine (no Flower here).

screened messages -> rule -> finite check -> x <- x - lr * aggregate. A round that cannot be
aggregated (too few valid messages, a rule error, a non-finite aggregate or step) leaves the
model unchanged and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from strategies.aggregators import AggregationError, Rule


@dataclass
class StepOutcome:
    """The model after the step (the same tensor when the round failed) and what happened."""

    point: torch.Tensor
    aggregate: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
    failure: str | None = None  # why the round failed, None when the model moved
    reason: str = ""  # a short tag for the metrics: 'too-few', 'rule-error', 'nonfinite'

    @property
    def failed(self) -> bool:
        return self.failure is not None


def server_step(point: torch.Tensor, messages: torch.Tensor, rule: Rule, lr: float) -> StepOutcome:
    """One aggregation and model step. ``messages`` (n, d) are already screened (finite rows)."""
    if messages.shape[0] < rule.min_messages():
        return StepOutcome(
            point,
            failure=f"{rule.name} needs at least {rule.min_messages()} valid messages, got {messages.shape[0]}",
            reason="too-few",
        )
    try:
        result = rule(messages)
    except AggregationError as exc:
        return StepOutcome(point, failure=str(exc), reason="rule-error")
    if not bool(torch.isfinite(result.vector).all()):
        return StepOutcome(
            point, info=result.info, failure=f"{rule.name} returned a non-finite aggregate", reason="nonfinite"
        )
    moved = point - lr * result.vector.to(point)
    if not bool(torch.isfinite(moved).all()):
        return StepOutcome(
            point,
            info=result.info,
            failure=f"the step lr * aggregate overflows the model (lr={lr})",
            reason="nonfinite",
        )
    return StepOutcome(moved, result.vector, dict(result.info))
