"""The simulation harness: a Grid wrapper between a stock Strategy loop and the SuperNodes.

It plays the parts of an experiment that no real server would: it knows which workers are
Byzantine, measures the honest messages (for the variance metric and for omniscient attacks),
and hands the Strategy one reply per worker in a seeded order that reveals no role. The
Strategy itself stays a plain Flower Strategy driving ``grid.send_and_receive``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from byzflower.layout import Layout
from clients.attacks import HonestStats
from clients.rng import derive_seed
from strategies.npy import decode
from strategies.strategy import _array


class HarnessError(RuntimeError):
    """The SuperNodes do not match the run (missing partitions, inconsistent node configs)."""


@dataclass
class RoundRecord:
    """What the harness saw in one iteration (kept for the results, never shown to the Strategy)."""

    iteration: int
    honest: torch.Tensor  # (H', d) honest messages received, worker order
    honest_ids: list[int]
    byzantine_ids: list[int]
    order: list[int]  # worker ids in the order the Strategy received them
    missing: list[int] = field(default_factory=list)  # workers whose node failed

    @property
    def honest_mean(self) -> torch.Tensor:
        return self.honest.mean(dim=0)

    @property
    def honest_variance(self) -> float:
        """mean_i ||m_i - mean(m_h)||^2 over the honest messages."""
        if self.honest.shape[0] == 0:
            return float("nan")
        return float((self.honest - self.honest_mean).pow(2).sum(dim=1).mean())


def _poll(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Push and wait for the replies, polling fast at first (Flower's own loop sleeps 0.1-3 s)."""
    ids = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.002
    while ids and (deadline is None or time.monotonic() < deadline):
        got = list(grid.pull_messages(ids))
        replies.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if ids:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.05)
    return replies


class Harness(Grid):
    """Wraps ``grid``; ``discover()`` must be called once before the first round."""

    def __init__(
        self, grid: Grid, layout: Layout, seed: int, omniscient: bool = False, timeout: float | None = 3600.0
    ) -> None:
        self.grid = grid
        self.layout = layout
        self.seed = int(seed)
        self.omniscient = bool(omniscient)
        self.timeout = timeout
        self.nodes: dict[int, tuple[list[int], list[int]]] = {}  # node id -> (honest, byzantine)
        self.last_round: RoundRecord | None = None

    # -- Grid pass-through ------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes) if self.nodes else self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # -- set-up -----------------------------------------------------------------------------
    def discover(self, wait: float = 120.0) -> None:
        """Ask every node which partition it is; check they cover the workers exactly.

        Real SuperNodes join when they are up, so a missing partition is waited for (up to
        ``wait`` seconds, asking only newly connected nodes); contradictions fail at once.
        """
        deadline = time.monotonic() + wait
        infos: dict[int, Any] = {}
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in infos]
            if new:
                infos.update(self._ask_partitions(new))
            problem = _coverage_problem(infos)
            if problem is None:
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"{problem} (waited {wait:.0f} s for SuperNodes to connect)")
            time.sleep(0.5)
        self.nodes = {
            nid: ([int(w) for w in i["honest"]], [int(w) for w in i["byzantine"]]) for nid, i in infos.items()
        }
        hosted = sorted(w for h, b in self.nodes.values() for w in h + b)
        if hosted != list(range(self.layout.num_workers)):
            raise HarnessError(f"nodes host workers {hosted}, expected 0..{self.layout.num_workers - 1}")

    def _ask_partitions(self, node_ids: list[int]) -> dict[int, Any]:
        query = [
            Message(
                RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=f"{MessageType.QUERY}.discover"
            )
            for n in node_ids
        ]
        replies = _poll(self.grid, query, self.timeout)
        failed = [r for r in replies if r.has_error()]
        if failed:
            raise HarnessError(f"{len(failed)} node(s) failed to start: {failed[0].error.reason}")
        return {r.metadata.src_node_id: r.content["node"] for r in replies}

    # -- rounds -----------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        timeout = self.timeout if timeout is None else timeout
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return _poll(self.grid, messages, timeout)
        config = messages[0].content["config"]
        iteration = int(config["server-round"])
        template = messages[0].content["arrays"]
        by_node = {m.metadata.dst_node_id: m for m in messages}

        # Phase 1: honest workers (and Byzantine ones whose attack needs no knowledge of others).
        phase1 = []
        for nid, msg in by_node.items():
            honest, byzantine = self.nodes.get(nid, ([], []))
            if honest or (byzantine and not self.omniscient):
                msg.content["config"] = ConfigRecord({**config, "phase": "honest"})
                phase1.append(msg)
        rows: dict[int, np.ndarray] = {}
        reply_to: dict[int, Message] = {}
        passthrough: list[Message] = []
        answered: set[int] = set()
        self._collect(_poll(self.grid, phase1, timeout), by_node, rows, reply_to, passthrough, answered)
        honest_ids = [w for w in self.layout.honest_ids if w in rows]
        honest = torch.from_numpy(np.stack([rows[w] for w in honest_ids])) if honest_ids else torch.zeros(0, 0)

        # Phase 2: omniscient attackers see the honest messages' statistics, nothing else.
        if self.omniscient and honest_ids:
            stats = HonestStats.of(honest)
            content = RecordDict(
                {
                    "stats": ArrayRecord({"mean": _array(stats.mean.numpy()), "std": _array(stats.std.numpy())}),
                    "config": ConfigRecord(
                        {"server-round": iteration, "phase": "byzantine", "honest-count": stats.count}
                    ),
                }
            )
            phase2 = [
                Message(content, dst_node_id=nid, message_type=MessageType.TRAIN)
                for nid, (_, byzantine) in self.nodes.items()
                if byzantine and nid in by_node
            ]
            targets = {m.metadata.dst_node_id: m for m in phase2}
            self._collect(_poll(self.grid, phase2, timeout), targets, rows, reply_to, passthrough, answered)

        order = [w for w in role_blind_order(self.seed, iteration, self.layout.num_workers) if w in rows]
        keys = list(template.keys())
        shapes = [tuple(template[k].shape) for k in keys]
        out = [
            Message(RecordDict({"gradient": _as_arrays(rows[w], keys, shapes)}), reply_to=reply_to[w]) for w in order
        ]
        expected = [w for h, b in self.nodes.values() for w in h + b]
        self.last_round = RoundRecord(
            iteration,
            honest,
            honest_ids,
            list(self.layout.byzantine_ids),
            order,
            sorted(w for w in expected if w not in rows),
        )
        return out + passthrough

    @staticmethod
    def _collect(
        replies: list[Message],
        sent: dict[int, Message],
        rows: dict[int, np.ndarray],
        reply_to: dict[int, Message],
        passthrough: list[Message],
        answered: set[int],
    ) -> None:
        for reply in replies:
            answered.add(reply.metadata.src_node_id)
            got = _split(reply)
            if got is None:
                passthrough.append(reply)  # the Strategy counts it as an error / malformed reply
                continue
            rows.update(got)
            instruction = sent.get(reply.metadata.src_node_id)
            for w in got:
                reply_to[w] = instruction if instruction is not None else reply


def role_blind_order(seed: int, iteration: int, num_workers: int) -> list[int]:
    """The order in which the Strategy receives the workers' messages at ``iteration``: a seeded
    permutation, so position says nothing about role."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "order", iteration))
    return [int(w) for w in torch.randperm(num_workers, generator=gen)]


def _split(reply: Message) -> dict[int, np.ndarray] | None:
    """worker id -> message row of a node's reply, or None when the reply is unusable."""
    if reply.has_error():
        return None
    try:
        ids = [int(w) for w in reply.content["workers"]["ids"]]
        block = decode(reply.content["rows"]["rows"])
    except Exception:
        return None
    if block.ndim != 2 or block.shape[0] != len(ids):
        return None
    return {w: block[i] for i, w in enumerate(ids)}


def _as_arrays(row: np.ndarray, keys: list[str], shapes: list[tuple[int, ...]]) -> ArrayRecord:
    """A flat row as an ArrayRecord shaped like the model (what RobustSGD expects); a row of the
    wrong length stays one flat array, which the strategy drops as malformed."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if row.size != sum(sizes):
        return ArrayRecord({"flat": _array(row)})
    record, offset = ArrayRecord(), 0
    for key, shape, n in zip(keys, shapes, sizes, strict=True):
        record[key] = _array(row[offset : offset + n].reshape(shape))
        offset += n
    return record


def _coverage_problem(infos: dict[int, Any]) -> str | None:
    """None when the nodes are partitions 0..K-1 once each; a message if some are missing.

    Raises when the nodes contradict each other (no later node can fix that).
    """
    if not infos:
        return "no SuperNode connected"
    ks = {int(i["num-partitions"]) for i in infos.values()}
    if len(ks) != 1:
        raise HarnessError(f"nodes disagree on num-partitions: {sorted(ks)}")
    (k,) = ks
    pids = sorted(int(i["partition-id"]) for i in infos.values())
    dup = sorted({p for p in pids if pids.count(p) > 1})
    if dup:
        raise HarnessError(f"nodes must have partition-id 0..{k - 1} once each; repeated {dup}")
    missing = sorted(set(range(k)) - set(pids))
    if missing:
        return f"nodes must have partition-id 0..{k - 1} once each; missing {missing}"
    return None
