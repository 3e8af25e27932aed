import pytest
import torch

from strategies.aggregators import AggregationError, Mean, make_rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_is_the_average(dtype):
    m = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]], dtype=dtype)
    out = Mean()(m)
    assert out.vector.dtype == dtype
    assert torch.equal(out.vector, torch.tensor([3.0, 3.0], dtype=dtype))


def test_rules_reject_bad_input():
    with pytest.raises(AggregationError, match=r"must be \(n, d\)"):
        Mean()(torch.ones(3))
    with pytest.raises(AggregationError, match="needs at least 1 messages, got 0"):
        Mean()(torch.ones(0, 4))
    with pytest.raises(AggregationError, match="floating point"):
        Mean()(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="choose one of"):
        make_rule("nope")
