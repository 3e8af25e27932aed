"""RobustFedAvg: Flower's FedAvg round with its average replaced by any byzflower rule.

A drop-in for ``flwr.serverapp.strategy.FedAvg`` in any Flower app whose clients train locally
and reply with their model (``content["arrays"]``) and a ``num-examples`` metric, as Flower's
quickstarts do. Each round the replies are screened (keys, shapes and a floating dtype checked from
the headers, non-finite values dropped, each counted in the round's metrics), turned into updates
(reply - current global model), aggregated by the rule, and the global model moves by the result.
With ``weighted=True`` the clients' ``num-examples`` weigh the mean (FedAvg) and the geometric median
(RFA, Pillutla, Kakade and Harchaoui 2022, which Flower lacks); the other rules treat replies alike, as
their papers do. Off by default: a sample count is the client's claim, and a Byzantine client that
claims a huge one would carry any weighted rule with it.
Rules that commute with a shift (mean, median, trimmed mean, GM, Krum, Multi-Krum, Bulyan, MDA, Meamed)
give the same model from updates as from weights; those that measure norms (CGE, clipping, ARC,
centred clipping) see the updates, as they should.
Detection, as the gradient-round engines score it: each reply's distrust (1 - its share of the
aggregate x the replies aggregated, floored at 0; 1 for a dropped reply), by the node that sent it,
averaged over the rounds that node replied in (``suspicion()``); rules without per-reply shares
(the coordinate-wise ones) score nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from logging import ERROR

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregators import GeometricMedian, Mean, Rule, distrust_of, make_rule
from strategies.messages import array, arrays_to_flat, read_flat


class RobustFedAvg(FedAvg):
    """FedAvg with ``rule`` in place of the weighted average.

    Args:
        rule: a byzflower rule object, or a rule's name (``make_rule``'s, with ``f`` and ``pre``).
        f: the Byzantine clients the rule assumes (where it takes f).
        pre: pre-aggregators in front of the rule ('none', 'nnm', 'bucketing,nnm', ...).
        weighted: weigh the mean and the geometric median by each reply's ``weighted_by_key`` metric
            (a client's claim: only where clients are trusted to report it).
        **kwargs: FedAvg's own arguments (fractions, minimum nodes, keys, metric aggregation); the
            others go to the rule named by ``rule`` (e.g. ``m`` for multi-krum).
    """

    def __init__(self, rule: Rule | str = "gm", *, f: int = 0, pre: str = "none", weighted: bool = False, **kwargs):
        own = set(inspect.signature(FedAvg.__init__).parameters)
        super().__init__(**{k: v for k, v in kwargs.items() if k in own})
        params = {k: v for k, v in kwargs.items() if k not in own}  # the rule's own (e.g. m, tol)
        if not isinstance(rule, str) and params:
            raise TypeError(f"parameters {sorted(params)} are for a rule given by name, not for a Rule object")
        self.rule = make_rule(rule, f=f, pre=pre, **params) if isinstance(rule, str) else rule
        if not isinstance(self.rule, Rule):
            raise TypeError(f"rule must be a byzflower Rule or a rule name, got {type(rule).__name__}")
        if self.rule.needs_workers:
            raise ValueError(
                f"{self.rule.name} must know which worker sent each update (a trusted pivot), but a FedAvg "
                "round's replies are anonymous clients' claims; choose another rule"
            )
        self.weighted = bool(weighted)
        self._global: tuple[np.ndarray, list[str], list[tuple[int, ...]], list[np.dtype]] | None = None
        self.last_info: dict[str, float] = {}
        self.last_shares: dict[int, float] = {}  # node id -> its reply's share of the last aggregate
        self._distrust: dict[int, tuple[float, int]] = {}  # node id -> (summed distrust, rounds scored)

    def suspicion(self) -> dict[int, float]:
        """{node id: mean distrust over the rounds it was scored in}, most suspected first: 0 for a
        node the rule always trusted at least as much as an average reply, 1 for one always left
        out or dropped. A client's node id is Flower's (``Message.metadata.src_node_id``)."""
        scores = {node: total / rounds for node, (total, rounds) in self._distrust.items()}
        return dict(sorted(scores.items(), key=lambda item: (-item[1], item[0])))

    def _score(self, distrust: dict[int, float]) -> None:
        for node, value in distrust.items():
            total, rounds = self._distrust.get(node, (0.0, 0))
            self._distrust[node] = (total + value, rounds + 1)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        flat, keys, shapes = arrays_to_flat(arrays)
        self._global = (flat.astype(np.float64), keys, shapes, [np.dtype(arrays[k].dtype) for k in keys])
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: the global model is unknown")
        start, keys, shapes, dtypes = self._global
        replies = list(replies)
        buffer = np.empty((len(replies), start.size), dtype=np.float32)  # the updates, one row per valid reply
        origin = start.astype(np.float32)
        samples, kept, dropped = [], [], []
        counts = {"dropped-error": 0, "dropped-malformed": 0, "dropped-nonfinite": 0}
        for reply in replies:
            if reply.has_error():
                counts["dropped-error"] += 1
                dropped.append(reply.metadata.src_node_id)
                continue
            record = reply.content.array_records.get(self.arrayrecord_key)
            flat, reason = read_flat(record, keys, shapes, buffer[len(kept)])
            weight = _weight(reply, self.weighted_by_key) if self.weighted else 1.0
            if flat is None or weight is None:
                counts[f"dropped-{reason if flat is None else 'malformed'}"] += 1
                dropped.append(reply.metadata.src_node_id)
                continue
            with np.errstate(over="ignore"):
                np.subtract(flat, origin, out=flat)
            if not np.isfinite(flat).all():  # finite values whose update overflows float32: unusable
                counts["dropped-nonfinite"] += 1
                dropped.append(reply.metadata.src_node_id)
                continue
            samples.append(weight)
            kept.append(reply)
        updates = buffer[: len(kept)]
        self._score(dict.fromkeys(dropped, 1.0))
        self.last_shares = {}
        if len(updates) < self.rule.min_messages():
            log(
                ERROR,
                "round %s: %d valid replies, %s needs %s",
                server_round,
                len(updates),
                self.rule.name,
                self.rule.requirement(),
            )
            return None, MetricRecord({**counts, "aggregated": len(updates), "failed": 1})
        messages = torch.from_numpy(updates)
        weights = np.asarray(samples, dtype=np.float64)
        if self.weighted and isinstance(self.rule, Mean | GeometricMedian):
            out = self.rule.weighted(messages, weights)
        else:
            out = self.rule(messages)
        step = out.vector.numpy().astype(np.float64)
        new = start + step
        with np.errstate(over="ignore"):
            moved = [new[a:b].astype(dtype) for (a, b), dtype in zip(_bounds(shapes), dtypes, strict=True)]
        if not np.isfinite(step).all() or not all(np.isfinite(m).all() for m in moved):
            log(
                ERROR,
                "round %s: %s returned an update that is not finite or overflows the model; the model is unchanged",
                server_round,
                self.rule.name,
            )
            return None, MetricRecord({**counts, "aggregated": len(updates), "failed": 1})
        self.last_info = dict(out.info)
        distrusted = len(dropped)
        if out.weights is not None:
            nodes = [reply.metadata.src_node_id for reply in kept]
            self.last_shares = dict(zip(nodes, np.asarray(out.weights, dtype=np.float64).tolist(), strict=True))
            distrust = distrust_of(out.weights)
            self._score(dict(zip(nodes, distrust.tolist(), strict=True)))
            distrusted += int(np.count_nonzero(distrust >= 0.5))
        arrays = ArrayRecord()
        for key, shape, part in zip(keys, shapes, moved, strict=True):  # the model's dtypes, as FedAvg keeps them
            arrays[key] = array(part.reshape(shape))
        try:  # the clients' own metrics, averaged as FedAvg does (needs each reply's weight key)
            metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        except Exception as exc:  # a client's metrics are not ours to trust: the round goes on
            log(ERROR, "round %s: the clients' metrics could not be averaged (%s)", server_round, exc)
            metrics = None
        record = MetricRecord(dict(metrics or {}))
        for name, value in {**counts, "aggregated": len(updates), "failed": 0, "distrusted": distrusted}.items():
            record[name] = value
        for name, value in out.info.items():
            record[f"rule-{name}"] = float(value)
        return arrays, record


def _bounds(shapes: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(start, end) of each array in the flat vector."""
    ends = np.cumsum([int(np.prod(shape, dtype=np.int64)) for shape in shapes], dtype=np.int64).tolist()
    return list(zip([0, *ends][: len(ends)], ends, strict=True))


def _weight(reply: Message, key: str) -> float | None:
    """The reply's sample count (``key`` in its metric records), None when absent, not a number (a
    list: MetricRecords hold those too) or not positive."""
    try:
        for metrics in reply.content.metric_records.values():
            if key in metrics:
                value = float(metrics[key])
                return value if np.isfinite(value) and value > 0 else None
    except (TypeError, ValueError):  # a client's claim: a bad one drops its reply, never the round
        return None
    return None
