"""``RobustSGD``: a Flower Strategy that aggregates gradients with a robust rule and steps the model.

Protocol (Flower Message API, keys in ``strategies.messages``): the strategy sends each node the
model as ``content["arrays"]`` (an ArrayRecord) and ``content["config"]`` (with ``server-round``); a
reply carries its gradient as ``content["gradient"]``, an ArrayRecord with the same keys and shapes
as the model. Replies
are screened (errors, missing or mis-shaped gradients, NaN/Inf are dropped and counted), the
rest are stacked into an (n, d) tensor, aggregated by the rule, and the model takes the step
x <- x - lr * g. The math lives in ``strategies.aggregators``; this class only orchestrates.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import ERROR, INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from strategies.aggregators import Rule, make_rule
from strategies.messages import (
    ARRAYS,
    CONFIG,
    GRADIENT,
    RESUME_FROM,
    SERVER_ROUND,
    arrays_to_flat,
    flat_to_arrays,
    read_flat,
)
from strategies.step import server_step

DROP_REASONS = ("error", "malformed", "nonfinite")


class RobustSGD(Strategy):
    """Byzantine-robust federated SGD: gradients in, ``x <- x - lr * rule(gradients)`` out.

    Args:
        rule: an aggregation rule object, or its name (built with default parameters).
        lr: step size gamma (> 0).
        device: where aggregation runs.
    """

    def __init__(self, rule: Rule | str = "mean", lr: float = 0.1, device: str | torch.device = "cpu") -> None:
        if isinstance(rule, str):
            rule = make_rule(rule)
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a Rule or a rule name, got {type(rule).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.rule = rule
        self.lr = float(lr)
        self.device = torch.device(device)
        self._keys: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._point: torch.Tensor | None = None
        self.last_metrics: MetricRecord | None = None
        self.last_aggregate: torch.Tensor | None = None
        self.last_valid: list[int] = []  # positions, among the last round's replies, of the aggregated ones
        self.last_weights: np.ndarray | None = None  # the rule's share of each aggregated reply
        self.round_offset = 0  # a resumed run: Flower's round r is iteration round_offset + r
        self._grid: Grid | None = None

    # -- model <-> flat vector ---------------------------------------------------------------
    def _load(self, arrays: ArrayRecord) -> None:
        flat, self._keys, self._shapes = arrays_to_flat(arrays)
        self._dim = flat.size
        self._point = torch.from_numpy(flat.astype(np.float32, copy=False)).to(self.device)

    def _to_arrays(self, x: torch.Tensor) -> ArrayRecord:
        return flat_to_arrays(x.detach().cpu().numpy(), self._keys, self._shapes)

    def gradient_of(self, reply: Message, out: np.ndarray | None = None) -> tuple[np.ndarray | None, str]:
        """The reply's flat gradient (written into ``out`` if given), or (None, reason) to drop it."""
        if reply.has_error():
            return None, "error"
        try:
            record = reply.content.array_records.get(GRADIENT)
        except Exception:
            return None, "malformed"
        return read_flat(record, self._keys, self._shapes, out)

    # -- Strategy -------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._load(arrays)
        self._grid = grid
        config = ConfigRecord({**config, SERVER_ROUND: server_round + self.round_offset})
        if server_round == 1 and self.round_offset:
            config[RESUME_FROM] = self.round_offset  # nodes put back their state of that iteration
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN) for node in grid.get_node_ids()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        buffer = np.empty((len(replies), self._dim), dtype=np.float32)
        n = 0
        counts = dict.fromkeys(DROP_REASONS, 0)
        self.last_valid = []
        for position, reply in enumerate(replies):
            flat, reason = self.gradient_of(reply, buffer[n])
            if flat is None:
                counts[reason] += 1
            else:
                self.last_valid.append(position)
                n += 1
        metrics = {"received": len(replies), "aggregated": n}
        metrics.update({f"dropped-{k}": v for k, v in counts.items()})
        assert self._point is not None
        messages = torch.from_numpy(buffer[:n]).to(self.device)
        outcome = server_step(self._point, messages, self.rule, self.lr, self._row_workers())
        self.last_aggregate = outcome.aggregate
        self.last_weights = outcome.weights  # per aggregated reply (positions: last_valid), for detection
        if outcome.failed:
            log(
                ERROR,
                "round %s failed: %s (%s); the model is unchanged",
                server_round,
                outcome.failure,
                ", ".join(f"{k}={v}" for k, v in metrics.items()),
            )
            self.last_metrics = MetricRecord({**metrics, "failed": 1, f"failed-{outcome.reason}": 1})
            return None, self.last_metrics
        self._point = outcome.point
        self.last_metrics = MetricRecord({**metrics, "failed": 0, **{f"rule-{k}": v for k, v in outcome.info.items()}})
        return self._to_arrays(self._point), self.last_metrics

    def _row_workers(self) -> list[int] | None:
        """Which worker each aggregated reply is, for rules that need it (MoNNA's pivot): known when
        the grid is byzflower's harness, which builds one reply per worker it assigned (``worker_ids``);
        None with a plain grid, whose replies are only nodes' claims."""
        if not self.rule.needs_workers:
            return None
        source = getattr(self._grid, "worker_ids", None)
        ids = source() if callable(source) else None
        return None if ids is None else [ids[p] for p in self.last_valid]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation is centralised (see ``start``'s ``evaluate_fn``)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── Aggregation rule: %r", self.rule)
        log(INFO, "\t└── Step size: %s", self.lr)
