"""Misbehaving-worker detection from what the rules compute anyway (no extra pass over the messages).

Each round a rule gives every aggregated row a share of the aggregate (``Aggregate.weights``:
Weiszfeld's coefficients, Krum's choice, the rows a filter kept, clipping factors). A worker's
distrust in a round is 1 - (its share x the number of workers aggregated), floored at 0: 0 when
the rule trusted it at least as much as an average worker, 1 when it was left out; a worker whose
message was dropped or never arrived has distrust 1. Its suspicion is its mean distrust over the
rounds seen. Only the recorder knows the roles, so only it scores the detection: precision of the
B most suspected workers (B = the Byzantine count; recall is then the same number) and the AUC
(the chance that a Byzantine worker is more suspected than an honest one, ties counted half).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.aggregators import distrust_of


def shares_of(weights: np.ndarray | None, valid_positions: list[int] | None, order: list[int]) -> dict[int, float]:
    """{worker: its share} from a rule's per-row ``weights``: row r is the valid_positions[r]-th
    message of the round, which came from worker order[position] (all positions when None)."""
    if weights is None:
        return {}
    positions = np.arange(len(weights)) if valid_positions is None else np.asarray(valid_positions, dtype=np.int64)
    if len(positions) != len(weights):
        raise ValueError(f"{len(weights)} shares for {len(positions)} aggregated messages")
    known = positions < len(order)
    workers = np.asarray(order, dtype=np.int64)[positions[known]]
    return dict(zip(workers.tolist(), np.asarray(weights, dtype=np.float64)[known].tolist(), strict=True))


class Suspicion:
    """Running per-worker suspicion over ``num_workers`` workers (state: two arrays)."""

    def __init__(self, num_workers: int) -> None:
        self.total = np.zeros(int(num_workers))
        self.rounds = 0

    def observe(self, shares: dict[int, float]) -> None:
        """One round's shares (workers absent from ``shares`` were not aggregated)."""
        if not shares:
            return
        distrust = np.ones_like(self.total)
        workers = np.fromiter(shares.keys(), dtype=np.int64, count=len(shares))
        values = np.fromiter(shares.values(), dtype=np.float64, count=len(shares))
        distrust[workers] = distrust_of(values)
        self.total += distrust
        self.rounds += 1

    def scores(self) -> np.ndarray | None:
        return self.total / self.rounds if self.rounds else None

    def quality(self, byzantine: list[int]) -> dict[str, float]:
        """Precision of the top-B suspects and the AUC; empty without both roles or without rounds."""
        scores = self.scores()
        byzantine = sorted(set(byzantine))
        if scores is None or not byzantine or len(byzantine) == len(scores):
            return {}
        bad = np.zeros(len(scores), dtype=bool)
        bad[byzantine] = True
        top = np.argsort(-scores, kind="stable")[: len(byzantine)]
        b, h = scores[bad], scores[~bad]
        auc = float((b[:, None] > h[None, :]).mean() + 0.5 * (b[:, None] == h[None, :]).mean())
        return {"detection_precision": float(bad[top].mean()), "detection_auc": auc}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.tolist(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = np.asarray(state["total"], dtype=np.float64)
        self.rounds = int(state["rounds"])
