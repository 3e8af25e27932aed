import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.app.error import Error

from strategies.aggregators import Mean
from strategies.strategy import RobustSGD

KEYS = {"w": (2, 3), "b": (2,)}


def _model(value=1.0):
    return ArrayRecord({k: Array(np.full(s, value, dtype=np.float32)) for k, s in KEYS.items()})


class _Grid:
    """Just enough of a Grid for configure_train: the node ids."""

    def get_node_ids(self):
        return [11, 12]


def _reply(instruction, record=None, error=None):
    if error is not None:
        return Message(error, reply_to=instruction)
    return Message(RecordDict({} if record is None else {"gradient": record}), reply_to=instruction)


def _gradient(values):
    flat = np.asarray(values, dtype=np.float32)
    return ArrayRecord({"w": Array(flat[:6].reshape(2, 3)), "b": Array(flat[6:])})


@pytest.fixture
def round_one(task_identity):
    strategy = RobustSGD(Mean(), lr=0.5)
    messages = list(strategy.configure_train(1, _model(1.0), ConfigRecord({"phase": "x"}), _Grid()))
    return strategy, messages


def test_configure_train_sends_the_model_to_every_node(round_one):
    _, messages = round_one
    assert [m.metadata.dst_node_id for m in messages] == [11, 12]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert messages[0].content["config"]["server-round"] == 1
    assert np.all(messages[0].content["arrays"]["w"].numpy() == 1.0)


def test_aggregate_steps_the_model_against_the_mean_gradient(round_one):
    strategy, (m, _) = round_one
    g1, g2 = np.arange(8, dtype=np.float32), np.full(8, 2.0, dtype=np.float32)
    arrays, metrics = strategy.aggregate_train(1, [_reply(m, _gradient(g1)), _reply(m, _gradient(g2))])
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    np.testing.assert_allclose(flat, 1.0 - 0.5 * (g1 + g2) / 2)
    assert list(arrays.keys()) == ["w", "b"] and arrays["w"].shape == (2, 3)
    assert metrics["aggregated"] == 2 and metrics["dropped-malformed"] == 0 and metrics["failed"] == 0


def test_malformed_nan_inf_and_error_replies_are_dropped_and_counted(round_one):
    strategy, (m, _) = round_one
    good = np.ones(8, dtype=np.float32)
    nan, inf = good.copy(), good.copy()
    nan[3], inf[7] = np.nan, -np.inf
    wrong_shape = ArrayRecord({"w": Array(np.ones((3, 2), dtype=np.float32)), "b": Array(np.ones(2, dtype=np.float32))})
    wrong_keys = ArrayRecord(
        {"w": Array(np.ones((2, 3), dtype=np.float32)), "bias": Array(np.ones(2, dtype=np.float32))}
    )
    ints = ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.int64)), "b": Array(np.ones(2, dtype=np.int64))})
    corrupt = _gradient(good)
    corrupt["b"] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage")
    replies = [
        _reply(m, _gradient(good)),
        _reply(m, _gradient(nan)),
        _reply(m, _gradient(inf)),
        _reply(m, wrong_shape),
        _reply(m, wrong_keys),
        _reply(m, ints),
        _reply(m, corrupt),
        _reply(m, None),  # no gradient at all
        _reply(m, error=Error(code=0, reason="node down")),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["received"] == 9 and metrics["aggregated"] == 1
    assert metrics["dropped-nonfinite"] == 2 and metrics["dropped-malformed"] == 5 and metrics["dropped-error"] == 1
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    assert np.isfinite(flat).all()
    np.testing.assert_allclose(flat, 1.0 - 0.5 * good)


def test_a_gradients_inner_header_is_checked_before_anything_is_allocated(round_one):
    """A reply whose Array declares the model's dtype and shape but whose .npy header claims 2e8 floats
    (48 bytes follow) is dropped as malformed without the 800 MB that np.load (Flower's Array.numpy)
    allocates from the claim; so is one whose header describes other bytes. Headers of other writers
    (Fortran order, version 2.0) that describe the declared array are read, in place."""
    import io
    import tracemalloc

    from strategies.npy import NUMPY_STYPE, decode, npy_header

    strategy, (m, _) = round_one
    evil = _gradient(np.ones(8))
    evil["w"] = Array(
        dtype="float32", shape=(2, 3), stype=NUMPY_STYPE, data=npy_header("<f4", (200_000_000,)) + bytes(48)
    )
    other = _gradient(np.ones(8))
    other["b"] = Array(dtype="float32", shape=(2,), stype=NUMPY_STYPE, data=npy_header("<f8", (1,)) + bytes(8))
    tracemalloc.start()
    try:
        _, metrics = strategy.aggregate_train(1, [_reply(m, _gradient(np.ones(8))), _reply(m, evil), _reply(m, other)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert metrics["aggregated"] == 1 and metrics["dropped-malformed"] == 2
    assert peak < 10_000_000, peak
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(decode(Array(fortran)), fortran)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, fortran, version=(2, 0))
    v2 = Array(dtype="float32", shape=(2, 3), stype=NUMPY_STYPE, data=buffer.getvalue())
    assert np.array_equal(decode(v2), fortran) and not decode(v2).flags.owndata


def test_a_round_without_valid_messages_fails_and_keeps_the_model(round_one):
    strategy, (m, _) = round_one
    bad = np.full(8, np.nan, dtype=np.float32)
    arrays, metrics = strategy.aggregate_train(1, [_reply(m, _gradient(bad))])
    assert arrays is None and metrics["failed"] == 1 and metrics["dropped-nonfinite"] == 1


def test_strategy_validates_its_parameters():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            RobustSGD("mean", lr=bad)
    with pytest.raises(ValueError, match="choose one of"):
        RobustSGD("no-such-rule")
    with pytest.raises(TypeError, match="rule must be a Rule"):
        RobustSGD(torch.mean)


@pytest.mark.parametrize("rule", ["gm", "centered-clipping", "krum", "median", "mean"])
def test_huge_finite_replies_never_make_the_model_non_finite(task_identity, rule):
    """Replies with entries of 1e18..3.4e38 (finite, so not screened out) against 5 honest ones."""
    from strategies.aggregators import make_rule

    strategy = RobustSGD(make_rule(rule, f=2), lr=0.1)
    (m, _) = list(strategy.configure_train(1, _model(1.0), ConfigRecord({}), _Grid()))
    gen = np.random.default_rng(0)
    honest = [_reply(m, _gradient(1.0 + 0.01 * gen.standard_normal(8))) for _ in range(5)]
    huge = [
        _reply(m, _gradient(np.full(8, 1e18))),
        _reply(m, _gradient(np.geomspace(1e18, 3.4e38, 8) * np.array([1, -1] * 4))),
    ]
    arrays, metrics = strategy.aggregate_train(1, honest + huge)
    if arrays is None:  # the mean's step overflows float32: the round fails, the model stays
        assert rule == "mean" and metrics["failed"] == 1 and metrics["failed-nonfinite"] == 1
        return
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy()])
    assert np.isfinite(flat).all() and metrics["failed"] == 0
    if rule != "mean":
        np.testing.assert_allclose(flat, 1.0 - 0.1 * 1.0, atol=0.1 * (0.05 + (rule == "centered-clipping") * 10))


def test_a_step_that_overflows_fails_the_round_and_keeps_the_model(round_one):
    strategy, (m, _) = round_one
    strategy.lr = 1e30
    arrays, metrics = strategy.aggregate_train(1, [_reply(m, _gradient(np.full(8, 1e20)))])
    assert arrays is None and metrics["failed"] == 1 and metrics["failed-nonfinite"] == 1
    assert np.all(strategy._point.numpy() == 1.0)


class _Harness(_Grid):
    """A grid that, like byzflower's harness, says which worker each reply of the round is."""

    def __init__(self, ids):
        self.ids = ids

    def worker_ids(self):
        return self.ids


def test_a_rule_that_needs_workers_gets_the_ids_of_the_replies_it_aggregates(task_identity):
    """MoNNA's pivot is worker 7: the reply at position 2 once the NaN reply before it is dropped;
    with a plain grid (replies are nodes' claims) no reply is trusted and the round fails."""
    from strategies.aggregators import MoNNA

    rows = [np.full(8, v, dtype=np.float32) for v in (0.0, np.nan, 10.0, 1.0, 2.0)]
    for grid, expect in ((_Harness([4, 9, 7, 3, 5]), 10.0), (_Grid(), None)):
        strategy = RobustSGD(MoNNA(f=2, pivot=7), lr=1.0)
        (m, _) = list(strategy.configure_train(1, _model(0.0), ConfigRecord({}), grid))
        arrays, metrics = strategy.aggregate_train(1, [_reply(m, _gradient(r)) for r in rows])
        if expect is None:
            assert arrays is None and metrics["failed-rule-error"] == 1
            continue
        # the 2 nearest of the 4 finite rows to the pivot's 10: itself and 2 -> mean 6
        assert metrics["failed"] == 0 and strategy.last_valid == [0, 2, 3, 4]
        np.testing.assert_allclose(arrays["b"].numpy(), -6.0)
