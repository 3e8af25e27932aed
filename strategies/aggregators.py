"""Aggregation rules: pure torch on an (n, d) tensor of messages, returning a (d,) tensor.

Each rule is a small callable object: parameters are validated when it is built, and a call
returns an ``Aggregate`` holding the vector and the rule's diagnostics (iterations used,
selected index, ...). No Flower import here: the rules are usable and testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Aggregate:
    """The aggregated (d,) vector and the rule's diagnostics (numbers only)."""

    vector: torch.Tensor
    info: dict[str, float] = field(default_factory=dict)


class AggregationError(ValueError):
    """The messages cannot be aggregated by this rule (too few, wrong shape or dtype)."""


class Rule:
    """Base class of aggregation rules."""

    name = "rule"

    def min_messages(self) -> int:
        """The fewest messages the rule accepts."""
        return 1

    def check(self, messages: torch.Tensor) -> None:
        if messages.dim() != 2:
            raise AggregationError(f"{self.name}: messages must be (n, d), got shape {tuple(messages.shape)}")
        if not messages.is_floating_point():
            raise AggregationError(f"{self.name}: messages must be floating point, got {messages.dtype}")
        if messages.shape[0] < self.min_messages():
            raise AggregationError(
                f"{self.name} needs at least {self.min_messages()} messages, got {messages.shape[0]}"
            )

    def __call__(self, messages: torch.Tensor) -> Aggregate:
        self.check(messages)
        return self.aggregate(messages)

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Mean(Rule):
    """The average of all messages (not robust: one Byzantine message moves it anywhere)."""

    name = "mean"

    def aggregate(self, messages: torch.Tensor) -> Aggregate:
        return Aggregate(messages.mean(dim=0))


RULES: dict[str, type[Rule]] = {"mean": Mean}


def make_rule(name: str, **params) -> Rule:
    """The rule ``name`` built with ``params``."""
    if name not in RULES:
        raise ValueError(f"aggregator={name!r} is not available; choose one of: {', '.join(RULES)}")
    return RULES[name](**params)
