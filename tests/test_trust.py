"""The server's trust boundary: which node hosts which workers, and which rows a reply may carry.

The harness runs against a scripted Grid whose nodes answer as byzflower's ClientApp does, or as a
rogue node would (every worker id, a wider row, float64, repeated ids, the same reply twice,
bytes that do not match their header, a stray partition claim, silence). Real SuperLink and
SuperNode processes are exercised in test_deployment.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from byzflower.flower.harness import Harness, HarnessError, node_rows
from byzflower.layout import Layout
from strategies.npy import NUMPY_STYPE, npy_bytes

D = 6  # model dimension: "w" (2, 2) + "b" (2,)
LAYOUT = Layout.last(4, 2)  # workers 0..3 honest, 4..5 Byzantine


def _rows_array(rows: np.ndarray) -> Array:
    return Array(dtype=str(rows.dtype), shape=tuple(rows.shape), stype=NUMPY_STYPE, data=npy_bytes(rows))


class ScriptedGrid:
    """Nodes answer synchronously; ``behave[node]`` may rewrite a node's honest reply."""

    def __init__(self, claims: dict[int, tuple[int, int]], behave=None, omniscient=False):
        self.claims = dict(claims)
        self.behave = behave or {}
        self.pending: dict[str, list[Message]] = {}
        self.ids = itertools.count()
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.claims)

    def push_messages(self, messages):
        out = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata._message_id = mid
            self.sent.append(msg)
            reply = self._answer(msg)
            self.pending[mid] = reply if isinstance(reply, list) else ([] if reply is None else [reply])
            out.append(mid)
        return out

    def pull_messages(self, ids):
        got = []
        for mid in ids:
            got.extend(self.pending.pop(mid, []))
        return got

    def _honest_reply(self, msg: Message, node: int) -> Message:
        pid, k = self.claims[node]
        workers = list(LAYOUT.node_workers(pid, k))
        honest, byzantine = LAYOUT.split(workers)
        ids = honest + byzantine if msg.content["config"]["phase"] == "honest" else byzantine
        rows = np.stack([np.full(D, float(w), dtype=np.float32) for w in ids])
        return self.reply(msg, ids, _rows_array(rows))

    @staticmethod
    def reply(msg: Message, ids, array: Array) -> Message:
        content = RecordDict({"rows": ArrayRecord({"rows": array}), "workers": ConfigRecord({"ids": list(ids)})})
        reply = Message(content, reply_to=msg)
        reply.metadata._src_node_id = msg.metadata.dst_node_id
        return reply

    def _answer(self, msg: Message):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type.endswith("discover"):
            pid, k = self.claims[node]
            reply = Message(
                RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": k})}), reply_to=msg
            )
            reply.metadata._src_node_id = node
            return reply
        honest = self._honest_reply(msg, node)
        rule = self.behave.get(node)
        return honest if rule is None else rule(self, msg, honest)


def _instruction(iteration: int = 1):
    arrays = ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32)), "b": Array(np.zeros(2, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": iteration})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _round(grid: ScriptedGrid, min_workers: int = 1, lines=None):
    log = None if lines is None else lines.append
    harness = Harness(grid, LAYOUT, seed=1, timeout=1.0, min_workers=min_workers, log=log)
    harness.discover(wait=1.0)
    replies = list(harness.send_and_receive([_instruction()]))
    return harness, replies


def _workers_seen(replies) -> dict[float, int]:
    """The value each delivered row carries (each honest node fills worker w's row with w)."""
    values = [float(r.content["gradient"]["b"].numpy()[0]) for r in replies]
    return {v: values.count(v) for v in values}


TWO_NODES = {10: (0, 2), 11: (1, 2)}  # node 10: workers 0..2, node 11: workers 3..5


def test_honest_nodes_deliver_every_worker_once(task_identity):
    harness, replies = _round(ScriptedGrid(TWO_NODES))
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}
    assert harness.last_round.missing == [] and harness.last_round.rejected == {}
    assert harness.nodes == {10: ([0, 1, 2], []), 11: ([3], [4, 5])}


def _rogue(ids=None, rows=None, array=None):
    def behave(grid, msg, honest):
        use_ids = ids if ids is not None else honest.content["workers"]["ids"]
        if array is not None:
            return grid.reply(msg, use_ids, array)
        return grid.reply(msg, use_ids, _rows_array(rows))

    return behave


CASES = {
    # a node that lists every worker id, to replace every honest message with its own value
    "foreign-ids": _rogue(ids=list(range(6)), rows=np.full((6, D), 1e6, dtype=np.float32)),
    "wrong-shape": _rogue(rows=np.ones((3, D + 1), dtype=np.float32)),
    "wrong-dtype": _rogue(rows=np.ones((3, D), dtype=np.float64)),
    "repeated-ids": _rogue(ids=[0, 0, 1], rows=np.ones((3, D), dtype=np.float32)),
    "undecodable": _rogue(
        array=Array(dtype="float32", shape=(3, D), stype=NUMPY_STYPE, data=b"\x93NUMPY garbage" + b"\0" * 80)
    ),
}


@pytest.mark.parametrize("reason", list(CASES))
def test_a_bad_reply_is_dropped_whole_counted_and_touches_no_other_node(task_identity, reason):
    lines = []
    harness, replies = _round(ScriptedGrid(TWO_NODES, behave={10: CASES[reason]}), lines=lines)
    assert harness.last_round.rejected == {reason: 1}
    assert harness.last_round.missing == [0, 1, 2]  # the rogue node's own workers, nobody else's
    assert _workers_seen(replies) == {3.0: 1, 4.0: 1, 5.0: 1}  # node 11's rows, untouched
    assert any("no message from workers [0, 1, 2]" in line and reason in line for line in lines)


def test_the_same_reply_twice_counts_once(task_identity):
    def twice(grid, msg, honest):
        return [honest, grid.reply(msg, [0, 1, 2], _rows_array(np.full((3, D), 9.0, dtype=np.float32)))]

    harness, replies = _round(ScriptedGrid(TWO_NODES, behave={10: twice}))
    assert harness.last_round.rejected == {"duplicate": 1}
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}  # the first reply's rows


def test_rows_are_checked_from_the_header_and_viewed_not_copied(task_identity):
    msg = _instruction()
    rows = np.arange(3 * D, dtype=np.float32).reshape(3, D)
    reply = ScriptedGrid.reply(msg, [7, 8, 9], _rows_array(rows))
    got, reason = node_rows(reply, [9, 8, 7], D)
    assert reason is None and np.array_equal(got[8], rows[1])
    assert not got[8].flags.writeable and got[8].base is not None  # a view of the received bytes
    assert node_rows(reply, [7, 8], D) == (None, "foreign-ids")
    assert node_rows(reply, [7, 8, 9], D + 1) == (None, "wrong-shape")
    huge = ScriptedGrid.reply(
        msg, [7], Array(dtype="float32", shape=(1, 10**12), stype=NUMPY_STYPE, data=b"")
    )  # a header promising 4 TB is refused before anything is allocated
    assert node_rows(huge, [7], D) == (None, "wrong-shape")


@pytest.mark.parametrize(
    "stray, reason",
    [
        ((0, 2), "claims partition-id=0, already held by another node"),
        ((5, 2), "claims partition-id=5, outside 0..1"),
        ((1, 3), "claims num-partitions=3, the federation has 2"),
    ],
)
def test_a_stray_node_is_refused_and_the_run_goes_on(task_identity, stray, reason):
    harness, replies = _round(ScriptedGrid({**TWO_NODES, 12: stray}))
    assert harness.refused == [{"node": 12, "reason": reason, "partition-id": stray[0], "num-partitions": stray[1]}]
    assert set(harness.nodes) == {10, 11} and _workers_seen(replies) == {float(w): 1 for w in range(6)}
    assert all(m.metadata.dst_node_id != 12 for m in harness.grid.sent if m.metadata.message_type == "train")


def test_a_node_alone_claiming_an_impossible_federation_does_not_set_its_size(task_identity):
    """The federation's size is a vote among the nodes' claims; a node that connects first, alone,
    claiming 10**6 partitions (or none) used to fix it (every later node then refused, and the
    run's error listed a million missing partitions). Such claims are refused and kept out of the
    vote; the discovery's error, when it comes, names them in a few lines."""
    for claimed in (10**6, 0, -3):
        harness = Harness(ScriptedGrid({9: (0, claimed)}), LAYOUT, seed=1, timeout=1.0)
        with pytest.raises(HarnessError, match="no SuperNode connected") as caught:
            harness.discover(wait=0.2)
        reason = f"claims num-partitions={claimed}, outside 1..100000"
        assert harness.refused == [{"node": 9, "reason": reason, "partition-id": 0, "num-partitions": claimed}]
        assert harness.num_partitions is None and len(str(caught.value)) < 300
    harness, replies = _round(ScriptedGrid({9: (0, 10**6), **TWO_NODES}))
    assert set(harness.nodes) == {10, 11} and _workers_seen(replies) == {float(w): 1 for w in range(6)}
    harness = Harness(ScriptedGrid({**TWO_NODES, 12: (0, 40)}), LAYOUT, seed=1, timeout=1.0)
    harness.num_partitions = 40  # a federation of 40 that few joined: the missing ones, shortened
    with pytest.raises(HarnessError, match=r"missing \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10\] and 29 more"):
        harness.discover(wait=0.2)


def test_a_silent_node_leaves_its_workers_missing_and_min_workers_stops_the_run(task_identity):
    silent = {11: lambda grid, msg, honest: None}
    harness, replies = _round(ScriptedGrid(TWO_NODES, behave=silent), min_workers=3)
    assert harness.last_round.missing == [3, 4, 5] and len(replies) == 3
    with pytest.raises(HarnessError, match=r"only 3 of 6 workers' messages arrived.*missing workers \[3, 4, 5\]"):
        _round(ScriptedGrid(TWO_NODES, behave=silent), min_workers=4)


def test_a_lost_node_is_replaced_by_a_new_one_whose_state_is_rebuilt(task_identity):
    grid = ScriptedGrid(TWO_NODES)
    harness, _ = _round(grid)
    del grid.claims[11]  # node 11 is lost; the device restarts with a new node id
    grid.claims[13] = (1, 2)
    replies = list(harness.send_and_receive([_instruction(2)]))
    assert harness.nodes == {10: ([0, 1, 2], []), 13: ([3], [4, 5])}
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}
    train = [m for m in grid.sent if m.metadata.message_type == "train"][-2:]
    assert {m.metadata.dst_node_id: m.content["config"]["rebuild"] for m in train} == {10: False, 13: True}


def test_a_lost_node_that_comes_back_with_its_id_is_asked_again(task_identity):
    """With SuperNode authentication a restarted device keeps its node id."""
    grid = ScriptedGrid(TWO_NODES)
    harness, _ = _round(grid)
    claim = grid.claims.pop(11)
    replies = list(harness.send_and_receive([_instruction(2)]))  # node 11 is gone this round
    assert harness.last_round.missing == [3, 4, 5] and len(replies) == 3
    grid.claims[11] = claim  # back, same id
    replies = list(harness.send_and_receive([_instruction(3)]))
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}
    train = [m for m in grid.sent if m.metadata.dst_node_id == 11 and m.metadata.message_type == "train"]
    assert train[-1].content["config"]["rebuild"] is True


def test_a_silent_node_yields_its_partition_to_a_newcomer_claiming_it(task_identity):
    """Without authentication a restarted device has a new node id while Flower still lists the
    old one: the silent holder gives way; a node that answered keeps its partition."""
    grid = ScriptedGrid(TWO_NODES, behave={11: lambda grid, msg, honest: None})
    harness, _ = _round(grid)
    assert harness.last_round.missing == [3, 4, 5]
    grid.claims[13] = (1, 2)  # the restarted device
    grid.claims[14] = (0, 2)  # a stray claim on a partition whose holder answers
    del grid.behave[11]
    replies = list(harness.send_and_receive([_instruction(2)]))
    assert harness.nodes == {10: ([0, 1, 2], []), 13: ([3], [4, 5])}
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}
    assert any(r["node"] == 14 and "already held" in r["reason"] for r in harness.refused)


def test_the_first_iteration_rebuilds_whatever_state_a_node_holds(task_identity):
    """A named run's state folder may survive an earlier run: iteration 1 of a fresh run always
    rebuilds it at the initial model (a resumed run restores its checkpoint instead)."""
    grid = ScriptedGrid(TWO_NODES)
    _round(grid)
    assert all(m.content["config"]["rebuild"] for m in grid.sent if m.metadata.message_type == "train")


def _rebuilt(grid, msg, honest):
    """A node that says it kept no state of the checkpoint it was asked to put back."""
    honest.content["state"] = ConfigRecord({"rebuilt": True})
    return honest


def _resume_instruction(iteration: int, resume_from: int):
    msg = _instruction(iteration)
    msg.content["config"]["resume-from"] = resume_from
    return msg


def test_workers_resumed_without_their_state_are_recorded_and_logged(task_identity):
    """A resumed run's first round: a node that kept no state of the checkpoint (or found it damaged)
    says so in its reply; its workers are named in the round's record and the log (they were rebuilt
    at the checkpoint's model, so their numbers are not an uninterrupted run's). The flag means nothing
    outside that round, and a reply that is dropped says nothing."""
    lines: list[str] = []
    grid = ScriptedGrid(TWO_NODES, behave={11: _rebuilt})
    harness, _ = _round(grid, lines=lines)
    assert harness.last_round.rebuilt == []  # not a resume round: the flag is not asked for
    replies = list(harness.send_and_receive([_resume_instruction(6, 5)]))
    assert _workers_seen(replies) == {float(w): 1 for w in range(6)}  # the rows are used as any others
    assert harness.last_round.rebuilt == [3, 4, 5]  # node 11 hosts workers 3..5
    assert any(
        "round 6: workers [3, 4, 5] resumed without their state of the checkpoint (iteration 5" in x for x in lines
    )

    def rebuilt_but_foreign(grid, msg, honest):  # dropped whole (foreign ids): its flag counts for nothing
        honest = _rebuilt(grid, msg, honest)
        honest.content["workers"] = ConfigRecord({"ids": [0, 1, 2]})
        return honest

    grid.behave[11] = rebuilt_but_foreign
    list(harness.send_and_receive([_resume_instruction(7, 5)]))
    assert harness.last_round.rebuilt == [] and harness.last_round.rejected == {"foreign-ids": 1}


def test_the_client_app_says_when_it_could_not_put_back_the_checkpoints_state(
    tmp_path, monkeypatch, mnist, task_identity
):
    """byzflower's ClientApp function, on real Flower messages: asked to resume from a checkpoint it
    does not hold, or holds in a form this code cannot take, it rebuilds its workers' state and says so;
    holding it, it puts it back and says nothing."""
    from flwr.app import Context

    from byzflower.config import resolve
    from byzflower.flower import client_app
    from byzflower.flower.node import NodeWorkers
    from strategies.messages import flat_to_arrays

    monkeypatch.setenv("BYZFLOWER_STATE_DIR", str(tmp_path))
    run_config = {"optimizer": "saga", "num-honest": 4, "num-byzantine": 2, "attack": "sign-flip", "seed": 3}
    run_config |= {"run-name": "resumed", "checkpoint-every": 5}
    context = Context(77, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), run_config)
    grads = NodeWorkers(resolve(run_config), 0, 1, 0).grads
    x = grads.initial_point().numpy()
    arrays = flat_to_arrays(x, list(grads.names), [tuple(s) for s in grads.shapes])

    def ask(iteration: int, **config) -> Message:
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": iteration, "phase": "honest", **config})}
        )
        msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
        return client_app.train(msg, context)

    client_app._NODES.clear()
    try:
        fresh = ask(6, **{"resume-from": 5})  # nothing kept for iteration 5
        assert fresh.content["state"]["rebuilt"] is True
        assert sorted(fresh.content["workers"]["ids"]) == [0, 1, 2, 3]  # sign-flip: Byzantine rows come later
        ask(5)  # iteration 5 of a named run with checkpoint-every 5: the node keeps its state
        client_app._NODES.clear()  # a new ClientApp process
        restored = ask(6, **{"resume-from": 5})
        assert "state" not in restored.content
        (kept,) = [p for p in tmp_path.rglob("5.pt")]  # a state another version wrote: a key it lacks
        import torch

        saved = torch.load(kept, weights_only=False)
        saved["state"] = {"honest": {k: v for k, v in saved["state"]["honest"].items() if k != "gbar"}}
        torch.save(saved, kept)
        client_app._NODES.clear()
        foreign = ask(6, **{"resume-from": 5})  # rebuilt and said, as with none (was a KeyError: no reply)
        assert foreign.content["state"]["rebuilt"] is True
    finally:
        client_app._NODES.clear()


def test_rebuilt_workers_reach_the_records_the_summary_and_a_checkpoint(tmp_path, mnist):
    """What the server does with a round's rebuilt workers: named in that evaluation's record
    (``rebuilt_workers``; [] otherwise, in both engines), counted and warned about in summary.json,
    and carried by the recorder's checkpoint state until the evaluation that writes them."""
    import json

    import torch

    from byzflower.config import resolve
    from byzflower.factory import dataset_of, gradients_of, recorder_of

    cfg = resolve({"num-honest": 4, "num-byzantine": 2, "eval-every": 2, "results-dir": str(tmp_path), "run-name": "r"})
    data = dataset_of(cfg)
    grads = gradients_of(cfg, data, torch.device("cpu"))
    recorder = recorder_of(cfg, data, grads, torch.device("cpu"), lambda _: None)
    x = grads.initial_point()
    recorder.begin(1)
    recorder.evaluate(0, x)
    recorder.observe(1, None, None, {}, {}, rebuilt=[3, 4, 5])
    state = recorder.state_dict()  # a checkpoint between the round and the evaluation
    recorder.observe(2, None, None, {}, {})
    first = recorder.evaluate(2, x)
    recorder.observe(3, None, None, {}, {})
    second = recorder.evaluate(4, x)
    assert first["rebuilt_workers"] == [3, 4, 5] and second["rebuilt_workers"] == []
    restored = recorder_of(cfg, data, grads, torch.device("cpu"), lambda _: None, recorder.run)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.evaluate(2, x)["rebuilt_workers"] == [3, 4, 5]
    summary = recorder.finish("finished")
    assert summary["totals"]["rebuilt_workers"] == 3
    assert any("3 worker(s) resumed without their checkpoint's state" in w for w in summary["warnings"])
