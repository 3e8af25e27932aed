"""The simulation harness: a Grid wrapper between a stock Strategy loop and the SuperNodes.

It plays the parts of an experiment that no real server would: it knows which workers are
Byzantine, measures the honest messages (for the variance metric and for omniscient attacks),
and hands the Strategy one reply per worker in a seeded order that reveals no role. The
Strategy itself stays a plain Flower Strategy driving ``grid.send_and_receive``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from byzflower.config import MAX_WORKERS
from byzflower.core import role_blind_order
from byzflower.layout import Layout
from clients.attacks import HonestStats
from strategies.messages import (
    ARRAYS,
    BYZANTINE,
    CONFIG,
    GRADIENT,
    HONEST,
    HONEST_COUNT,
    IDS,
    PHASE,
    REBUILD,
    REBUILT,
    RESUME_FROM,
    ROWS,
    SERVER_ROUND,
    STATE,
    STATS,
    WORKERS,
    array,
    flat_to_arrays,
)
from strategies.npy import NUMPY_STYPE, npy_header


class HarnessError(RuntimeError):
    """The run cannot go on: no valid set of SuperNodes, or fewer workers' messages than needed."""


#: why a node's reply was dropped whole (counted per round, never a crash)
REJECT_REASONS = (
    "error",  # the node's ClientApp failed, or Flower reports the node unavailable
    "unexpected",  # a reply to no message of this round, or from another node than asked
    "duplicate",  # a second reply to one message
    "foreign-ids",  # rows for workers the node was not asked for (or not all it was asked for)
    "repeated-ids",  # one worker id listed twice
    "wrong-dtype",  # rows not float32
    "wrong-shape",  # not (asked workers, model dimension)
    "undecodable",  # missing records, or bytes that do not match their header
)


@dataclass
class RoundRecord:
    """What the harness saw in one iteration (kept for the results, never shown to the Strategy)."""

    honest: torch.Tensor  # (H', d) honest messages received, worker order
    byzantine_ids: list[int]
    order: list[int]  # worker ids in the order the Strategy received them
    missing: list[int] = field(default_factory=list)  # workers whose message did not arrive
    rejected: dict[str, int] = field(default_factory=dict)  # dropped node replies by reason
    rebuilt: list[int] = field(default_factory=list)  # workers resumed without their checkpoint's state


class StopRequest:
    """A request, from another thread, that the run stop: ``check()`` then raises ``KeyboardInterrupt``.

    Flower's simulation runs the ServerApp in a thread of ``flwr-simulation``, whose main thread
    alone receives signals and then ends the process; the ServerApp has itself called first and
    sets this (``server_app._stop_request``). The harness checks it whenever it waits for replies
    (every round), so the run unwinds and records how it ended."""

    def __init__(self) -> None:
        self._set = threading.Event()
        self.reason = "stopped"

    def set(self, reason: str) -> None:
        self.reason = reason
        self._set.set()

    def is_set(self) -> bool:
        return self._set.is_set()

    def check(self) -> None:
        if self._set.is_set():
            raise KeyboardInterrupt(self.reason)


def _push(grid: Grid, messages: list[Message]) -> dict[str, int]:
    """Push ``messages``; message id -> the node it went to."""
    ids = list(grid.push_messages(messages))
    return {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}


def _pull(grid: Grid, ids: set[str], timeout: float | None) -> list[Message]:
    """Wait for replies to ``ids``, polling fast at first (Flower's own loop sleeps 0.1-3 s)."""
    ids = set(ids)
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


def poll(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Push and wait for the replies."""
    return _pull(grid, set(_push(grid, messages)), timeout)


Log = Callable[[str], None]


class Harness(Grid):
    """Wraps ``grid``; ``discover()`` must be called once before the first round.

    The trust boundary of the server: it decides which workers each node hosts (from the node's
    partition claim, checked against the others), and accepts from a node exactly the rows of
    the workers it asked that node for, checked from the array's header before any data is
    copied. Anything else is dropped whole and counted by reason in the round's record.
    """

    def __init__(
        self,
        grid: Grid,
        layout: Layout,
        seed: int,
        omniscient: bool = False,
        timeout: float | None = 300.0,
        share_messages: bool = False,
        min_workers: int = 1,
        log: Log | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.grid = grid
        self.stop = stop or StopRequest()
        self.layout = layout
        self.seed = int(seed)
        self.omniscient = bool(omniscient)
        self.share_messages = bool(share_messages)  # phase 2 also carries the honest messages themselves
        self.timeout = timeout
        self.min_workers = int(min_workers)
        self.log = log or (lambda _: None)
        self.num_partitions: int | None = None
        self.partition_of: dict[int, int] = {}  # admitted node id -> its partition
        self.nodes: dict[int, tuple[list[int], list[int]]] = {}  # node id -> (honest, byzantine)
        self.refused: list[dict[str, Any]] = []  # claims refused, with the reason
        self.rebuild: set[int] = set()  # nodes that rejoined: their workers' state is rebuilt
        self._asked: set[int] = set()  # every node id ever asked for its partition
        self._claims: dict[int, tuple[int, int]] = {}  # node id -> (partition-id, num-partitions)
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
        self.stop.check()  # every wait for replies goes through here
        return self.grid.pull_messages(message_ids)

    # -- which node hosts which workers ----------------------------------------------------------
    def discover(self, wait: float = 120.0) -> None:
        """Ask every node which partition it holds, until partitions 0..K-1 all have a node.

        Real SuperNodes join when they are up, so a missing partition is waited for (up to
        ``wait`` seconds, asking only newly connected nodes). A claim that contradicts the
        others (another K, a partition out of range or already held) is refused and reported;
        the run goes on with the rightful nodes.
        """
        deadline = time.monotonic() + wait
        while True:
            self._ask_new_nodes(self.timeout)
            problem = self._admit()
            if problem is None:
                break
            if time.monotonic() > deadline:
                refused = "; ".join(f"node {r['node']}: {r['reason']}" for r in self.refused)
                raise HarnessError(
                    f"{problem} (waited {wait:.0f} s for SuperNodes to connect)"
                    + (f"; refused: {refused}" if refused else "")
                )
            self.stop.check()
            time.sleep(0.5)
        for r in self.refused:
            self.log(f"refused SuperNode {r['node']}: {r['reason']}")

    def _ask_new_nodes(self, timeout: float | None) -> None:
        new = [n for n in self.grid.get_node_ids() if n not in self._asked]
        if not new:
            return
        self._asked.update(new)
        query = [
            Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=f"{MessageType.QUERY}.discover")
            for n in new
        ]
        sent = _push(self, query)
        replies = _pull(self, set(sent), timeout)
        errors = []
        order = {nid: i for i, nid in enumerate(new)}  # earlier-connected nodes keep a contested partition
        replies.sort(key=lambda r: order.get(sent.get(r.metadata.reply_to_message_id), len(order)))
        for reply in replies:
            nid = sent.get(reply.metadata.reply_to_message_id)
            if nid is None:
                continue
            if reply.has_error():
                errors.append(reply.error.reason)
                self._refuse(nid, None, f"failed to start: {reply.error.reason}")
                continue
            try:
                info = reply.content["node"]
                claim = (int(info["partition-id"]), int(info["num-partitions"]))
            except Exception:
                self._refuse(nid, None, "sent no readable partition claim")
                continue
            if not 1 <= claim[1] <= MAX_WORKERS:  # kept out of the vote on the federation's size
                self._refuse(nid, claim, f"claims num-partitions={claim[1]}, outside 1..{MAX_WORKERS}")
                continue
            self._claims[nid] = claim
        if errors and len(errors) == len(new) and not self._claims:
            raise HarnessError(f"{len(errors)} node(s) failed to start: {errors[0]}")

    def _refuse(self, nid: int, claim: tuple[int, int] | None, reason: str) -> None:
        if all(r["node"] != nid for r in self.refused):
            entry = {"node": nid, "reason": reason}
            if claim is not None:
                entry.update({"partition-id": claim[0], "num-partitions": claim[1]})
            self.refused.append(entry)

    def _admit(self) -> str | None:
        """Admit claims in arrival order; None once every partition has a node."""
        if not self._claims and not self.partition_of:
            return "no SuperNode connected"
        if self.num_partitions is None:
            counts: dict[int, int] = {}
            for _, k in self._claims.values():
                counts[k] = counts.get(k, 0) + 1
            self.num_partitions = max(counts, key=lambda k: (counts[k], -k))
        k = self.num_partitions
        held = set(self.partition_of.values())
        for nid, (pid, claimed_k) in list(self._claims.items()):
            if nid in self.partition_of:
                continue
            if claimed_k != k:
                reason = f"claims num-partitions={claimed_k}, the federation has {k}"
            elif not 0 <= pid < k:
                reason = f"claims partition-id={pid}, outside 0..{k - 1}"
            elif pid in held:
                reason = f"claims partition-id={pid}, already held by another node"
            else:
                self.partition_of[nid] = pid
                held.add(pid)
                workers = self.layout.node_workers(pid, k)
                self.nodes[nid] = self.layout.split(workers)
                continue
            del self._claims[nid]
            self._refuse(nid, (pid, claimed_k), reason)
        missing = sorted(set(range(k)) - held)
        if missing:
            shown = f"{missing}" if len(missing) <= 10 else f"{missing[:10]} and {len(missing) - 10} more"
            return f"nodes must have partition-id 0..{k - 1} once each; missing {shown}"
        return None

    def _replace_lost_nodes(self) -> None:
        """Nodes Flower no longer lists lose their partition; newly connected nodes may take it
        (a restarted device gets a new node id). Their workers' state is rebuilt next round."""
        live = set(self.grid.get_node_ids())
        lost = [nid for nid in self.partition_of if nid not in live]
        for nid in lost:
            self.log(f"SuperNode {nid} (partition {self.partition_of[nid]}) is gone; its workers are missing")
            del self.partition_of[nid], self.nodes[nid]
            self._claims.pop(nid, None)
            self._asked.discard(nid)  # with authentication a restarted device comes back with this id
        if live - self._asked and (len(self.partition_of) < (self.num_partitions or 0) or self.rebuild):
            # A node that was silent last round yields its partition to a newcomer claiming it (a
            # restarted device without authentication gets a new node id before Flower notices
            # the old one is gone).
            claims = self._claims.copy()
            self._ask_new_nodes(min(self.timeout or 30.0, 30.0))
            for nid, (pid, _) in list(self._claims.items()):
                holder = next((h for h, p in self.partition_of.items() if p == pid), None)
                if nid not in claims and holder in self.rebuild:
                    self.log(f"SuperNode {holder} (partition {pid}) was silent; node {nid} takes its place")
                    del self.partition_of[holder], self.nodes[holder]
                    self._claims.pop(holder, None)
            before = set(self.partition_of)
            self._admit()
            for nid in set(self.partition_of) - before:
                self.rebuild.add(nid)
                self.log(f"SuperNode {nid} joined as partition {self.partition_of[nid]}; its workers' state is rebuilt")

    # -- rounds -----------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.timeout is not None:  # round-timeout bounds Flower's own (an hour by default)
            timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return poll(self, messages, timeout)
        self._replace_lost_nodes()
        anchor = messages[0]  # the strategy's instruction the built replies answer
        config = anchor.content[CONFIG]
        iteration = int(config[SERVER_ROUND])
        template = anchor.content[ARRAYS]
        keys = list(template.keys())
        shapes = [tuple(template[k].shape) for k in keys]
        dim = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        rows: dict[int, np.ndarray] = {}
        rejected: dict[str, int] = {}

        # Phase 1: honest workers (and Byzantine ones whose attack needs no knowledge of others).
        expected: dict[int, list[int]] = {}
        phase1 = []
        for nid, (honest, byzantine) in self.nodes.items():
            asked = honest + ([] if self.omniscient else byzantine)
            if asked:
                expected[nid] = asked
                # iteration 1 of a fresh run: whatever a node's disk holds (a named run's folder
                # from an earlier run) is rebuilt at the initial model
                phase_config = {**config, PHASE: HONEST, REBUILD: nid in self.rebuild or iteration == 1}
                content = RecordDict({ARRAYS: template, CONFIG: ConfigRecord(phase_config)})
                phase1.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN))
        rebuilt: set[int] = set()
        resumed = int(config.get(RESUME_FROM, 0))
        self._exchange(phase1, expected, dim, timeout, rows, rejected, rebuilt if resumed else None)
        if rebuilt:
            self.log(
                f"round {iteration}: workers {sorted(rebuilt)} resumed without their state of the checkpoint "
                f"(iteration {resumed}: their nodes kept none, or it was damaged); it was rebuilt at the "
                "checkpoint's model, so their SAGA/SVRG/SARAH messages differ from an uninterrupted run's"
            )
        # A node that did not answer may have restarted (with authentication it keeps its node id):
        # its workers' state is rebuilt at the model when it answers again.
        self.rebuild = {nid for nid, asked in expected.items() if asked[0] not in rows}
        honest_ids = [w for w in self.layout.honest_ids if w in rows]
        honest = torch.from_numpy(np.stack([rows[w] for w in honest_ids])) if honest_ids else torch.zeros(0, dim)

        # Phase 2: omniscient attackers see the honest messages' statistics (and the messages
        # themselves for the attacks that need them: Mimic, MinMax, MinSum), nothing else.
        if self.omniscient and honest_ids:
            stats = HonestStats.of(honest)
            shared = {"mean": array(stats.mean.numpy()), "std": array(stats.std.numpy())}
            if self.share_messages:
                shared["honest"] = array(honest.numpy())
            content = RecordDict(
                {
                    STATS: ArrayRecord(shared),
                    CONFIG: ConfigRecord({SERVER_ROUND: iteration, PHASE: BYZANTINE, HONEST_COUNT: stats.count}),
                }
            )
            expected = {nid: byz for nid, (_, byz) in self.nodes.items() if byz}
            phase2 = [Message(content, dst_node_id=nid, message_type=MessageType.TRAIN) for nid in expected]
            self._exchange(phase2, expected, dim, timeout, rows, rejected)

        order = [w for w in role_blind_order(self.seed, iteration, self.layout.num_workers) if w in rows]
        out = [Message(RecordDict({GRADIENT: flat_to_arrays(rows[w], keys, shapes)}), reply_to=anchor) for w in order]
        missing = sorted(set(range(self.layout.num_workers)) - set(rows))
        self.last_round = RoundRecord(
            honest, list(self.layout.byzantine_ids), order, missing, rejected, sorted(rebuilt)
        )
        if missing or rejected:
            shown = ", ".join(f"{k} {v}" for k, v in rejected.items())
            self.log(
                f"round {iteration}: no message from workers {missing}"
                + (f"; replies dropped: {shown}" if shown else "")
            )
        if len(rows) < self.min_workers:
            raise HarnessError(
                f"round {iteration}: only {len(rows)} of {self.layout.num_workers} workers' messages arrived, "
                f"fewer than the {self.min_workers} needed (min-workers); missing workers {missing}"
            )
        return out

    def worker_ids(self) -> list[int] | None:
        """The worker each reply of the last round came from, in the order handed to the Strategy
        (the harness built those replies from rows it asked for by id)."""
        return None if self.last_round is None else list(self.last_round.order)

    def _exchange(
        self,
        messages: list[Message],
        expected: dict[int, list[int]],
        dim: int,
        timeout: float | None,
        rows: dict[int, np.ndarray],
        rejected: dict[str, int],
        rebuilt: set[int] | None = None,
    ) -> None:
        """Send one phase and keep, from each asked node's first reply, exactly the asked rows (and,
        given ``rebuilt``, the workers of the replies that say their state was rebuilt)."""
        if not messages:
            return
        sent = _push(self, messages)
        answered: set[str] = set()
        for reply in _pull(self, set(sent), timeout):
            nid = sent.get(reply.metadata.reply_to_message_id)
            reason = None
            if nid is None or (not reply.has_error() and reply.metadata.src_node_id != nid):
                reason = "unexpected"
            elif reply.metadata.reply_to_message_id in answered:
                reason = "duplicate"
            elif reply.has_error():
                reason = "error"
            if reason is None:
                got, reason = node_rows(reply, expected[nid], dim)
                if got is not None:
                    rows.update(got)
                    if rebuilt is not None and _says_rebuilt(reply):
                        rebuilt.update(got)
            if nid is not None:
                answered.add(reply.metadata.reply_to_message_id)
            if reason is not None:
                rejected[reason] = rejected.get(reason, 0) + 1


def _says_rebuilt(reply: Message) -> bool:
    """Whether an accepted reply says its workers' state was rebuilt (a record, not a trust decision:
    the rows are checked as any others)."""
    try:
        return reply.content[STATE][REBUILT] is True
    except Exception:  # absent, or not a ConfigRecord: says nothing
        return False


def node_rows(reply: Message, asked: list[int], dim: int) -> tuple[dict[int, np.ndarray] | None, str | None]:
    """worker id -> row of a node's reply, or (None, reason) when it must be dropped whole.

    The ids must be exactly ``asked`` (any order, none repeated); the rows array must be float32
    of shape (len(asked), dim), checked from its header before any data is read; the data is
    then viewed in place, not copied."""
    try:
        claimed = reply.content[WORKERS][IDS]
        if len(claimed) != len(asked):  # before reading them: a node may send any number
            return None, "foreign-ids"
        ids = [int(w) for w in claimed]
        record = reply.content[ROWS][ROWS]
        dtype, shape, data = np.dtype(record.dtype), tuple(int(s) for s in record.shape), record.data
    except Exception:
        return None, "undecodable"
    if len(set(ids)) != len(ids):
        return None, "repeated-ids"
    if sorted(ids) != sorted(asked):
        return None, "foreign-ids"
    if dtype != np.float32:
        return None, "wrong-dtype"
    if shape != (len(ids), dim):
        return None, "wrong-shape"
    header = npy_header(dtype.str, shape)
    if record.stype != NUMPY_STYPE or len(data) != len(header) + 4 * len(ids) * dim or not data.startswith(header):
        return None, "undecodable"
    block = np.frombuffer(data, dtype=np.float32, offset=len(header)).reshape(shape)
    return {w: block[i] for i, w in enumerate(ids)}, None
