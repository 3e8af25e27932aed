"""The byzflower ClientApp: a SuperNode computing the messages of the workers it hosts.

Message types:
- ``query.discover``: reply with the node's partition and hosted workers.
- ``train`` with ``config["phase"] == "honest"``: the honest workers' messages at the model (and the
  Byzantine workers' too when their attack needs no knowledge of the honest messages). With
  ``config["rebuild"]`` (a node that joined mid-run) the workers' state is first rebuilt at the model.
- ``train`` with ``config["phase"] == "byzantine"``: the omniscient attack's messages, crafted from the
  honest messages' statistics in ``content["stats"]`` (mean, std) and ``config["honest-count"]``.
- ``query.cleanup``: delete this run's worker state from the node's disk.
Replies with worker messages carry ``content["rows"]`` (ArrayRecord, one (k, d) array) and
``content["workers"]["ids"]``; the ServerApp's harness turns them into one reply per worker.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from byzflower.config import resolve
from byzflower.flower.node import NodeWorkers
from byzflower.flower.node_state import remove_run_state, state_key
from clients.attacks import HonestStats
from strategies.messages import (
    ARRAYS,
    BYZANTINE,
    CONFIG,
    HONEST,
    HONEST_COUNT,
    PHASE,
    REBUILD,
    RESUME_FROM,
    SERVER_ROUND,
    STATS,
    arrays_to_flat,
    rows_content,
)
from strategies.npy import decode

app = ClientApp()

_NODES: dict[tuple[int, int, int], NodeWorkers] = {}


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    try:
        return int(cfg["partition-id"]), int(cfg["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            f'node config lacks {exc}: start the SuperNode with --node-config "partition-id=P num-partitions=K"'
        ) from None


def node_for(context: Context) -> NodeWorkers:
    """The node's worker host, built once per process and run."""
    pid, k = _partition(context)
    key = (context.run_id, pid, k)
    if key not in _NODES:
        for stale in [k_ for k_ in _NODES if k_[0] != context.run_id]:
            del _NODES[stale]  # a process serves one run at a time
        _NODES[key] = NodeWorkers(resolve(context.run_config), pid, k, context.run_id)
    return _NODES[key]


def _flat(arrays: ArrayRecord, names: list[str]) -> torch.Tensor:
    flat, keys, _ = arrays_to_flat(arrays)
    if keys != names:
        raise ValueError(f"model arrays {keys} do not match this node's model {names}")
    return torch.from_numpy(flat)


def rows_reply(msg: Message, workers: list[int], rows: torch.Tensor, rebuilt: bool = False) -> Message:
    return Message(rows_content(workers, rows.detach().cpu().numpy(), rebuilt), reply_to=msg)


@app.query("discover")
def discover(msg: Message, context: Context) -> Message:
    pid, k = _partition(context)
    node = node_for(context)
    reply = ConfigRecord(
        {
            "partition-id": pid,
            "num-partitions": k,
            "honest": [int(w) for w in node.honest_ids],
            "byzantine": [int(w) for w in node.byzantine_ids],
        }
    )
    return Message(RecordDict({"node": reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = node_for(context)
    config = msg.content[CONFIG]
    phase = config.get(PHASE)
    iteration = int(config[SERVER_ROUND])
    if phase == HONEST:
        rebuilt = False
        if config.get(REBUILD, False):  # this node (re)joined mid-run: its state is rebuilt at x
            node.reset()
        elif int(config.get(RESUME_FROM, 0)):  # a resumed named run: the state of its checkpoint
            rebuilt = not node.restore(int(config[RESUME_FROM]))  # none kept (or damaged): said in the reply
        x = _flat(msg.content[ARRAYS], node.grads.names)
        workers, rows = list(node.honest_ids), [node.honest_messages(x, iteration)]
        if node.byzantine_ids and not node.omniscient:  # attacks that need no knowledge go in the same round
            workers += node.byzantine_ids
            rows.append(node.byzantine_messages(x, iteration, None))
        every = int(node.cfg["checkpoint-every"])
        if node.cfg["run-name"] and every and iteration % every == 0:
            node.checkpoint(iteration)  # the server checkpoints this iteration too
        return rows_reply(msg, workers, torch.cat(rows), rebuilt)
    if phase == BYZANTINE:
        stats_record = msg.content[STATS]
        honest = torch.from_numpy(decode(stats_record["honest"]).copy()) if "honest" in stats_record else None
        stats = HonestStats(
            torch.from_numpy(decode(stats_record["mean"]).copy()),
            torch.from_numpy(decode(stats_record["std"]).copy()),
            int(config[HONEST_COUNT]),
            honest,
        )
        return rows_reply(msg, node.byzantine_ids, node.byzantine_messages(None, iteration, stats))
    raise ValueError(f"unknown phase {phase!r}; this ClientApp is driven by byzflower's ServerApp")


@app.query("cleanup")
def cleanup(msg: Message, context: Context) -> Message:
    removed = remove_run_state(state_key(context.run_config, context.run_id))
    _NODES.clear()
    return Message(RecordDict({"cleanup": ConfigRecord({"removed": removed})}), reply_to=msg)
