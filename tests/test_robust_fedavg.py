"""RobustFedAvg: Flower's FedAvg round with a byzflower rule, against Flower's own robust strategies."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from strategies.aggregators import GeometricMedian
from strategies.robust_fedavg import RobustFedAvg

SHAPES = {"w": (3, 4), "b": (4,)}


class _Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _arrays(flat):
    flat = np.asarray(flat, dtype=np.float32)
    return ArrayRecord({"w": Array(flat[:12].reshape(3, 4).copy()), "b": Array(flat[12:].copy())})


def _round(strategy, clients, start, examples=None):
    """configure_train then aggregate_train on the clients' models (flat (16,) each)."""
    instructions = list(strategy.configure_train(1, _arrays(start), ConfigRecord({}), _Grid(len(clients))))
    replies = []
    for i, flat in enumerate(clients):
        content = RecordDict(
            {"arrays": _arrays(flat), "metrics": MetricRecord({"num-examples": (examples or {}).get(i, 10)})}
        )
        replies.append(Message(content, reply_to=instructions[i % len(instructions)]))
    arrays, metrics = strategy.aggregate_train(1, replies)
    flat = None if arrays is None else np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    return flat, metrics


def _clients(n=11, bad=2, seed=0):
    g = np.random.default_rng(seed)
    honest = 1.0 + 0.1 * g.standard_normal((n - bad, 16))
    return [*honest, *(50.0 + g.standard_normal((bad, 16)))]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: RobustFedAvg("mean", weighted=True), lambda: FedAvg()),
        (lambda: RobustFedAvg("median"), lambda: FedMedian()),
        (lambda: RobustFedAvg("trimmed-mean", f=2), lambda: FedTrimmedAvg(beta=0.2)),
        (lambda: RobustFedAvg("krum", f=2), lambda: Krum(num_malicious_nodes=2)),
        (lambda: RobustFedAvg("multi-krum", f=2, m=5), lambda: MultiKrum(num_malicious_nodes=2, num_nodes_to_select=5)),
    ],
    ids=["mean=FedAvg", "median=FedMedian", "trimmed=FedTrimmedAvg", "krum=Krum", "multi-krum=MultiKrum"],
)
def test_where_definitions_match_flowers_strategies_give_the_same_model(ours, theirs, task_identity):
    clients, start = _clients(), np.zeros(16)
    # FedAvg (and Flower's Multi-Krum, over its selection) weigh by sample count; so does the weighted mean
    examples = {i: 5 + 3 * i for i in range(11)} if isinstance(ours(), RobustFedAvg) and ours().weighted else None
    mine, metrics = _round(ours(), clients, start, examples)
    flower, _ = _round(theirs(), clients, start, examples)
    np.testing.assert_allclose(mine, flower, rtol=1e-5, atol=1e-6)
    assert metrics["aggregated"] == 11 and metrics["failed"] == 0


def test_bulyan_differs_from_flowers_in_the_selection_and_both_resist(task_identity):
    """Flower's Bulyan picks its theta = n - 2f replies by Multi-Krum in one go; El Mhamdi et al. (and
    ours) re-score after each pick (iterated Krum), so the honest subsets, hence the results, differ."""
    clients = _clients(n=11, bad=2)
    mine, _ = _round(RobustFedAvg("bulyan", f=2), clients, np.zeros(16))
    flower, _ = _round(Bulyan(num_malicious_nodes=2), clients, np.zeros(16))
    honest = np.asarray(clients[:9])
    for result in (mine, flower):
        assert ((result >= honest.min(0) - 1e-6) & (result <= honest.max(0) + 1e-6)).all()
    assert not np.allclose(mine, flower)


def test_the_geometric_median_flower_lacks_resists_what_fedavg_does_not(task_identity):
    clients = _clients(n=11, bad=3)
    gm, metrics = _round(RobustFedAvg("gm"), clients, np.zeros(16))
    avg, _ = _round(FedAvg(), clients, np.zeros(16))
    honest_mean = np.mean(clients[:8], axis=0)
    assert np.abs(gm - honest_mean).max() < 0.2 and np.abs(avg - honest_mean).max() > 10
    assert metrics["rule-iterations"] >= 1
    # RFA's weighted median: a client's claimed sample count carries it (why weighted is off by default)
    heavy, _ = _round(RobustFedAvg("gm", weighted=True), clients, np.zeros(16), {8: 10_000})
    assert np.abs(heavy - clients[8]).max() < 0.05
    # with equal weights the weighted median is the median
    same, _ = _round(RobustFedAvg("gm", weighted=True), clients, np.zeros(16))
    np.testing.assert_allclose(same, gm, atol=1e-4)


def test_the_weighted_geometric_median_is_stationary():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(9, 5, generator=g, dtype=torch.float64)
    a = np.linspace(1.0, 3.0, 9)
    z = GeometricMedian(tol=1e-12, max_iter=5000).weighted(m, a).vector
    unit = (z - m) / (z - m).norm(dim=1, keepdim=True)
    assert float((torch.from_numpy(a)[:, None] * unit).sum(0).norm()) < 1e-6


def test_bad_replies_are_dropped_and_counted_and_the_round_goes_on(task_identity):
    clients = _clients(n=9, bad=0)
    strategy = RobustFedAvg("gm")
    instructions = list(strategy.configure_train(1, _arrays(np.zeros(16)), ConfigRecord({}), _Grid(9)))
    replies = [
        Message(
            RecordDict({"arrays": _arrays(c), "metrics": MetricRecord({"num-examples": 10})}), reply_to=instructions[i]
        )
        for i, c in enumerate(clients[:6])
    ]
    nan = clients[6].copy()
    nan[3] = np.nan
    replies.append(
        Message(
            RecordDict({"arrays": _arrays(nan), "metrics": MetricRecord({"num-examples": 10})}),
            reply_to=instructions[6],
        )
    )
    wrong = ArrayRecord({"w": Array(np.zeros((4, 3), dtype=np.float32)), "b": Array(np.zeros(4, dtype=np.float32))})
    replies.append(
        Message(RecordDict({"arrays": wrong, "metrics": MetricRecord({"num-examples": 10})}), reply_to=instructions[7])
    )
    replies.append(Message(RecordDict({"metrics": MetricRecord({"num-examples": 10})}), reply_to=instructions[8]))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["aggregated"] == 6 and metrics["dropped-nonfinite"] == 1 and metrics["dropped-malformed"] == 2
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    assert np.isfinite(flat).all() and arrays["w"].numpy().dtype == np.float32
    with pytest.raises(ValueError, match="choose one of"):
        RobustFedAvg("nope")


def test_sample_counts_that_are_not_positive_finite_numbers_drop_the_reply(task_identity):
    """With weighted=True a reply's claimed num-examples weighs it: a list, nan, inf, 0 or negative
    claims are malformed replies, dropped and counted, never a weight."""
    clients = _clients(n=9, bad=0)
    strategy = RobustFedAvg("gm", weighted=True)
    instructions = list(strategy.configure_train(1, _arrays(np.zeros(16)), ConfigRecord({}), _Grid(9)))
    claims = [10, 10, 10, 10, [1.0, 2.0], float("nan"), float("inf"), 0, -5]  # a list crashed the round
    replies = [
        Message(
            RecordDict({"arrays": _arrays(c), "metrics": MetricRecord({"num-examples": k})}), reply_to=instructions[i]
        )
        for i, (c, k) in enumerate(zip(clients, claims, strict=True))
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["aggregated"] == 4 and metrics["dropped-malformed"] == 5
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    assert np.isfinite(flat).all()


def _replies(strategy, clients, server_round=1):
    """configure_train, then replies from the nodes the instructions went to: ``clients`` a list of
    models (one per instruction, in order) or {node id: model} (a node missing there does not reply);
    a model None is a reply without one (malformed). Returns (replies, the replying nodes' ids)."""
    instructions = list(strategy.configure_train(server_round, _arrays(np.zeros(16)), ConfigRecord({}), _Grid(11)))
    if isinstance(clients, list):
        clients = {i.metadata.dst_node_id: flat for i, flat in zip(instructions, clients, strict=False)}
    replies, nodes = [], []
    for instruction in instructions:
        node = instruction.metadata.dst_node_id
        if node not in clients:
            continue
        content = RecordDict({"metrics": MetricRecord({"num-examples": 10})})
        if clients[node] is not None:
            content["arrays"] = _arrays(clients[node])
        replies.append(Message(content, reply_to=instruction))
        nodes.append(node)
    return replies, nodes


def test_suspicion_names_the_nodes_the_rule_left_out_and_the_dropped_ones(task_identity):
    """Detection as the engines score it, keyed by Flower's node ids: GM all but ignores the two far
    replies (distrust ~1, the honest ones ~0); a dropped reply counts 1 for its round; a node that did
    not reply in a round keeps its score; Krum keeps one reply (all others distrusted); the median has
    no per-reply shares (only drops are scored)."""
    clients = _clients(n=11, bad=2)
    gm = RobustFedAvg("gm")
    replies, nodes = _replies(gm, clients)
    _, metrics = gm.aggregate_train(1, replies)
    first = gm.suspicion()
    far, honest = set(nodes[9:]), nodes[:9]
    assert set(list(first)[:2]) == far and all(first[n] > 0.9 for n in far)
    assert max(first[n] for n in honest) < 0.3 and metrics["distrusted"] == 2
    assert sum(gm.last_shares.values()) == pytest.approx(1.0) and set(gm.last_shares) == set(nodes)
    # round 2: the first honest node sends no model, the last far node does not reply at all
    second = {node: flat for node, flat in zip(nodes[:10], [None, *clients[1:10]], strict=True)}
    replies, _ = _replies(gm, second, server_round=2)
    _, metrics = gm.aggregate_train(2, replies)
    scores = gm.suspicion()
    assert metrics["dropped-malformed"] == 1 and metrics["distrusted"] == 2
    assert scores[nodes[0]] == pytest.approx((first[nodes[0]] + 1.0) / 2)
    assert scores[nodes[10]] == first[nodes[10]]  # not scored in a round it missed
    assert nodes[0] not in gm.last_shares
    krum = RobustFedAvg("krum", f=2)
    replies, nodes = _replies(krum, clients)
    _, metrics = krum.aggregate_train(1, replies)
    assert metrics["distrusted"] == 10 and sorted(krum.suspicion().values()) == [0.0] + [1.0] * 10
    median = RobustFedAvg("median")
    replies, nodes = _replies(median, [None, *clients[1:]])
    _, metrics = median.aggregate_train(1, replies)
    assert median.suspicion() == {nodes[0]: 1.0} and median.last_shares == {} and metrics["distrusted"] == 1


def test_updates_and_models_beyond_float32_are_never_applied(task_identity):
    """Near float32's limit: a reply whose update (reply - model) overflows float32 is dropped as
    non-finite (it reached the rule as an infinite row); a step that would take the model past
    float32 (here a user's rule that extrapolates) fails the round and keeps the model."""
    from strategies.aggregators import Aggregate, Mean

    big = np.float32(3.0e38)
    clients = [np.full(16, big) for _ in range(8)] + [np.full(16, -3.4e38, dtype=np.float32)]
    flat, metrics = _round(RobustFedAvg("gm"), clients, np.full(16, big))
    assert metrics["failed"] == 0 and metrics["aggregated"] == 8 and metrics["dropped-nonfinite"] == 1
    assert np.isfinite(flat).all() and np.allclose(flat, big)

    class Extrapolate(Mean):
        def __call__(self, messages):
            return Aggregate(5.0 * messages.mean(dim=0))

    ahead = [np.full(16, 3.4e38, dtype=np.float32) for _ in range(3)]  # updates 4e37: x5 passes 3.4e38
    flat, metrics = _round(RobustFedAvg(Extrapolate()), ahead, np.full(16, big))
    assert flat is None and metrics["failed"] == 1
