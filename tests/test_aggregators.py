"""Aggregation rules against their definitions: hand-computed cases, plain slow references,
defining properties, robustness, precision, and parameter validation."""

import itertools
import math

import numpy as np
import pytest
import torch

from strategies import kernels
from strategies.aggregators import (
    NNM,
    AggregationError,
    Bulyan,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    TrimmedMean,
    make_rule,
)

DTYPES = [torch.float32, torch.float64]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def honest_and_outliers(n_honest=30, n_bad=10, d=50, scale=1e6, seed=0, dtype=torch.float64):
    g = _gen(seed)
    honest = torch.randn(n_honest, d, generator=g, dtype=torch.float64) + 3.0
    bad = scale * torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, bad]).to(dtype), honest.to(dtype)


# -- plain references, written the slow obvious way ------------------------------------------
def ref_weiszfeld(m: torch.Tensor, tol=1e-5, max_iter=80, eps=1e-8):
    m = m.double()
    z = m.mean(0)
    for _ in range(max_iter):
        w = torch.tensor([1.0 / max(float((row - z).norm()), eps) for row in m], dtype=torch.float64)
        nz = (w[:, None] * m).sum(0) / w.sum()
        moved = float((nz - z).norm())
        z = nz
        if moved <= tol:
            break
    return z


def ref_krum_index(m, f):
    n = len(m)
    scores = []
    for i in range(n):
        dists = sorted(float(((m[i] - m[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return int(np.argmin(scores))


def ref_coordinate(m, fn):
    cols = []
    for j in range(m.shape[1]):
        cols.append(fn(sorted(m[:, j].tolist())))
    return torch.tensor(cols, dtype=torch.float64)


def ref_median(values):
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


# -- hand-computed cases -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_is_isfinite_all_even_where_the_sum_overflows(dtype):
    big = torch.finfo(dtype).max
    cases = [
        [1.0, -2.0, 3.0],
        [big, big, big],  # finite entries whose sum overflows: checked one by one
        [big, -big, big, -big],
        [big, big, math.inf],
        [1.0, math.nan, 2.0],
        [-math.inf, 0.0],
        [math.inf, -math.inf],  # inf - inf: a NaN sum
        [],
    ]
    for case in cases:
        t = torch.tensor(case, dtype=dtype)
        assert kernels.all_finite(t) == bool(torch.isfinite(t).all()), case
    assert kernels.all_finite(torch.full((3, 4), big, dtype=dtype))  # any shape
    assert not kernels.all_finite(torch.tensor([[1.0, 2.0], [3.0, math.nan]], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_rows_is_isfinite_all_per_row_in_every_float_dtype(dtype):
    """numpy reads float32/float64 row sums, torch the others: the same answer as the definition,
    rows whose finite entries overflow the sum included."""
    from strategies.aggregators import finite_rows

    big = torch.finfo(dtype).max
    m = torch.ones(6, 5, dtype=dtype)
    m[1, 2] = math.nan
    m[2, :3] = big  # finite, the sum overflows
    m[3, 0], m[3, 1] = math.inf, -math.inf
    m[4, 4] = -math.inf
    ok = finite_rows(m)
    assert ok.dtype == torch.bool and ok.tolist() == torch.isfinite(m).all(dim=1).tolist() == [1, 0, 1, 0, 0, 1]
    assert finite_rows(torch.ones(3, 2, dtype=dtype)).tolist() == [True] * 3


def test_hand_computed_cases():
    m = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [100.0, 100.0]], dtype=torch.float64)
    assert torch.equal(Mean()(m).vector, torch.tensor([20.8, 20.8], dtype=torch.float64))
    assert torch.equal(Median()(m).vector, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.equal(TrimmedMean(1)(m).vector, torch.tensor([4 / 3, 4 / 3], dtype=torch.float64))
    # Krum, f = 1: each corner's 2 nearest others are at squared distance 4 + 4 = 8; the outlier's 2 are huge
    out = Krum(1)(m)
    assert out.info["selected"] in (0, 1, 2, 3) and out.info["score"] == 8.0
    # even n: the standard median averages the two middle values, 'lower' takes the lower one
    e = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert Median()(e).vector.item() == 6.0 and Median("lower")(e).vector.item() == 2.0
    # geometric median of a symmetric configuration plus a far point: pulled only slightly
    sq = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    assert torch.allclose(GeometricMedian()(sq).vector, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    three = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    gm = GeometricMedian(tol=1e-12, max_iter=1000)(three).vector  # the Fermat point of this triangle
    assert abs(sum(float((gm - p).norm()) for p in three) - 6.766432) < 1e-5


# -- defining properties -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_geometric_median_satisfies_the_optimality_condition(dtype):
    m = torch.randn(41, 300, generator=_gen(1), dtype=torch.float64).to(dtype)
    out = GeometricMedian(tol=1e-9, max_iter=2000)(m)
    z = out.vector.double()
    diff = m.double() - z
    unit = diff / diff.norm(dim=1, keepdim=True)
    # subgradient of sum_i ||m_i - z|| vanishes at the minimiser (no message coincides with z)
    residual = float(unit.sum(0).norm()) / len(m)
    assert residual < (1e-6 if dtype == torch.float64 else 1e-3)
    cost = lambda v: float((m.double() - v).norm(dim=1).sum())  # noqa: E731
    assert cost(z) < cost(m.double().mean(0)) and cost(z) < cost(Median()(m).vector.double())
    assert out.info["converged"] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", ["gaussian", "outliers-1e6", "identical-copies", "zero-sum", "tight-cluster", "coincident-point"]
)
def test_geometric_median_matches_plain_weiszfeld(dtype, case):
    g = _gen(2)
    honest = torch.randn(50, 400, generator=g, dtype=torch.float64)
    if case == "gaussian":
        bad = honest.mean(0) + 30 * torch.randn(20, 400, generator=g, dtype=torch.float64)
    elif case == "outliers-1e6":
        bad = 1e6 * torch.randn(20, 400, generator=g, dtype=torch.float64)
    elif case == "identical-copies":  # sign-flip: 20 identical rows
        bad = (-3 * honest.mean(0)).expand(20, -1)
    elif case == "zero-sum":  # zero-gradient: everything sums to zero
        bad = (-honest.sum(0) / 20).expand(20, -1)
    elif case == "tight-cluster":  # variance-reduced honest messages: a large common part, tiny spread
        honest = 5.0 + 1e-3 * honest
        bad = honest.mean(0) + 30 * torch.randn(20, 400, generator=g, dtype=torch.float64)
    else:  # the mean itself is one of the messages
        bad = honest.mean(0).expand(1, -1)
    m = torch.cat([honest, bad]).to(dtype)
    got = GeometricMedian()(m).vector.double()
    exact = ref_weiszfeld(m, tol=1e-13, max_iter=20_000)  # the minimiser itself
    spread = float((honest - honest.mean(0)).norm(dim=1).mean())
    tol = 1e-4 if dtype == torch.float64 else 1e-3
    assert float((got - exact).norm()) <= tol * spread
    cost = lambda v: float((m.double() - v).norm(dim=1).sum())  # noqa: E731
    assert cost(got) - cost(exact) <= (1e-8 if dtype == torch.float64 else 1e-4) * cost(exact)


@pytest.mark.parametrize("pre", ["none", "nnm"])
def test_geometric_median_accuracy_does_not_depend_on_the_data_scale(pre):
    """The stopping tolerance and the distance floor are relative to the data's spread."""
    g = _gen(21)
    honest = torch.randn(50, 200, generator=g, dtype=torch.float64)
    m = torch.cat([honest, (-3 * honest.mean(0)).expand(20, -1)])
    rule = make_rule("gm", f=20, pre=pre)
    gaps = []
    for scale in (1e-6, 1e-3, 1.0, 1e3, 1e6):
        x = scale * m
        got = rule(x).vector
        exact = rule.rule(x).vector if pre == "nnm" else None
        if exact is None:
            exact = ref_weiszfeld(x, tol=1e-13 * scale, max_iter=20_000, eps=1e-300)
        else:  # NNM's mixed messages, then the exact GM of them
            d2 = torch.cdist(x, x) ** 2
            mixed = torch.stack([x[torch.argsort(d2[i])[:50]].mean(0) for i in range(70)])
            exact = ref_weiszfeld(mixed, tol=1e-13 * scale, max_iter=20_000, eps=1e-300)
        gaps.append(float((got - exact).norm()) / scale)
    assert max(gaps) <= 1e-4 * float(honest.std(0).norm())
    assert max(gaps) <= 2 * min(gaps) + 1e-12  # the same relative accuracy at every scale


def test_wide_inputs_take_the_blocked_gram_and_stay_exact():
    """d above the blocking threshold: the centred Gram is accumulated block by block."""
    g = _gen(12)
    d = kernels._CHUNK_FROM + 1234
    honest = 2.0 + 1e-2 * torch.randn(12, d, generator=g, dtype=torch.float64)
    m = torch.cat([honest, 1e3 * torch.randn(4, d, generator=g, dtype=torch.float64)])
    gram = kernels.centered_gram(m)
    x = m - m[gram.center]
    assert torch.allclose(gram.matrix, x @ x.T, rtol=1e-12, atol=1e-9)
    got32 = GeometricMedian()(m.float()).vector.double()
    ref = ref_weiszfeld(m.float())
    spread = float((honest - honest.mean(0)).norm(dim=1).mean())
    assert float((got32 - ref).norm()) <= 2e-3 * spread


def test_krum_returns_an_input_and_ignores_far_clustered_outliers():
    for seed in range(5):
        m, _ = honest_and_outliers(seed=seed, scale=100.0)
        bad = m[30:].mean(0)  # make the outliers a tight cluster far away
        m[30:] = bad + 0.01 * torch.randn(10, 50, generator=_gen(seed), dtype=torch.float64)
        out = Krum(10)(m)
        assert out.info["selected"] < 30
        assert any(torch.equal(out.vector, row) for row in m)
        assert out.info["selected"] == ref_krum_index(m, 10)


@pytest.mark.parametrize("n", [9, 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_median_and_trimmed_mean_equal_plain_references(n, dtype):
    m = torch.randn(n, 300, generator=_gen(n), dtype=torch.float64).to(dtype)
    m[:, :7] = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0, 9.0][:n], dtype=dtype)[:, None]  # ties
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(Median()(m).vector.double(), ref_coordinate(m, ref_median), atol=tol)
    lower = ref_coordinate(m, lambda v: v[(len(v) - 1) // 2])
    assert torch.allclose(Median("lower")(m).vector.double(), lower, atol=tol)
    assert torch.equal(Median("lower")(m).vector, m.median(dim=0).values)  # torch's (the notebook's) median
    for f in (0, 1, 3):
        ref = ref_coordinate(m, lambda v, f=f: sum(v[f : len(v) - f]) / (len(v) - 2 * f))
        assert torch.allclose(TrimmedMean(f)(m).vector.double(), ref, atol=tol)


def test_order_statistics_take_the_threaded_path_on_wide_inputs():
    m = torch.randn(12, 20_000, generator=_gen(3))
    ref = m.sort(dim=0).values[2:10].mean(0)
    assert torch.allclose(TrimmedMean(2)(m).vector, ref, atol=1e-6)


def test_bulyan_against_its_definition():
    m, honest = honest_and_outliers(n_honest=15, n_bad=3, d=40, scale=1e3, seed=4)
    out = Bulyan(3)(m).vector
    # reference: iterated Krum selection written plainly, then the beta closest to the median
    remaining, chosen = list(range(18)), []
    for _ in range(18 - 6):
        sub = m[remaining]
        chosen.append(remaining.pop(ref_krum_index(sub, 3) if len(sub) - 3 - 2 >= 1 else 0))
    s = m[chosen]
    beta = len(chosen) - 6
    cols = []
    for j in range(40):
        col = s[:, j]
        med = ref_median(sorted(col.tolist()))
        cols.append(sorted(col.tolist(), key=lambda v, med=med: abs(v - med))[:beta])
    ref = torch.tensor([sum(c) / beta for c in cols], dtype=torch.float64)
    assert torch.allclose(out, ref, atol=1e-10)
    assert bool(((out >= honest.min(0).values) & (out <= honest.max(0).values)).all())


def test_multi_krum_averages_the_best_scored():
    m, _ = honest_and_outliers(seed=5, scale=1e3)
    out = MultiKrum(10, m=5)(m)
    scores = kernels.krum_scores(kernels.squared_distances(kernels.centered_gram(m)), 10)
    best = torch.topk(scores, 5, largest=False).indices
    assert torch.allclose(out.vector, m[best].mean(0)) and bool((best < 30).all())
    assert torch.allclose(MultiKrum(0, m=40)(m).vector, m.mean(0))  # m = n, f = 0: the mean


def test_centered_clipping_follows_its_update_and_keeps_state():
    m = torch.tensor([[0.0, 0.0], [2.0, 0.0], [100.0, 0.0]], dtype=torch.float64)
    cc = CenteredClipping(tau=1.0, iterations=1, init="zero")
    # v = 0 + mean of clip_1(m_i - 0) = mean([0,0], [1,0], [1,0]) = [2/3, 0]
    assert torch.allclose(cc(m).vector, torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    prev = CenteredClipping(tau=1.0, iterations=1, init="previous")
    first = prev(m).vector
    second = prev(m).vector  # starts from the first aggregate
    assert torch.allclose(second, first + (m - first).div((m - first).norm(dim=1, keepdim=True).clamp_min(1.0)).mean(0))
    prev.reset()
    assert torch.allclose(prev(m).vector, first)


def test_nnm_mixes_nearest_neighbours_before_the_rule():
    m, _ = honest_and_outliers(n_honest=12, n_bad=4, d=20, scale=1e4, seed=6)
    rule = NNM(Mean(), f=4)
    d2 = torch.cdist(m, m) ** 2
    mixed = torch.stack([m[torch.argsort(d2[i])[:12]].mean(0) for i in range(16)])
    assert torch.allclose(rule(m).vector, mixed.mean(0), rtol=1e-9, atol=1e-6)
    assert make_rule("median", f=4, pre="nnm").name == "nnm+median"


# -- invariances and robustness ----------------------------------------------------------------------
ALL_RULES = [
    Mean(),
    GeometricMedian(),
    Krum(5),
    MultiKrum(5),
    Median(),
    TrimmedMean(5),
    Bulyan(5),
    CenteredClipping(init="median"),
    NNM(GeometricMedian(), 5),
]
ROBUST = [r for r in ALL_RULES if not isinstance(r, Mean | CenteredClipping)]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_permutation_invariance(rule):
    m = torch.randn(23, 64, generator=_gen(7), dtype=torch.float64)
    perm = torch.randperm(23, generator=_gen(8))
    a, b = rule(m).vector, rule(m[perm]).vector
    assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("rule", ROBUST, ids=lambda r: r.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_robust_rules_stay_in_the_honest_range_under_1e6_outliers(rule, dtype):
    m, honest = honest_and_outliers(n_honest=18, n_bad=5, d=64, scale=1e6, seed=9, dtype=dtype)
    out = rule(m).vector.double()
    lo, hi = honest.double().min(0).values, honest.double().max(0).values
    slack = 1e-4 * (hi - lo)
    assert bool(((out >= lo - slack) & (out <= hi + slack)).all())
    assert out.dtype == torch.float64 and rule(m).vector.dtype == dtype
    assert float(Mean()(m).vector.double().abs().max()) > 1e4  # the mean is dragged away


def test_identical_copies_get_exactly_zero_distance_in_float32():
    honest = torch.randn(50, 39_760, generator=_gen(10))
    copies = (-3 * honest.mean(0)).expand(20, -1)
    m = torch.cat([honest, copies])
    d2 = kernels.squared_distances(kernels.centered_gram(m))
    assert bool((d2[50:, 50:] == 0).all()) and bool((d2 >= 0).all())
    assert float(d2[:50, :50].sum()) > 0


@pytest.mark.parametrize("d", [46, 512])
def test_narrow_float32_messages_get_an_exact_float64_gram_on_the_cpu(d):
    """At most 512 coordinates (logistic regression on IJCNN1: 46) the CPU forms the Gram matrix in
    float64 from one copy, centred at the medoid: exact to float64 rounding, even with a large
    common part and attackers at float32's limit; identical copies at distance exactly 0; and GM
    equal to the reference Weiszfeld."""
    g = _gen(d)
    honest = 5.0 + 1e-3 * torch.randn(50, d, generator=g)
    m = torch.cat([honest, (-3 * honest.mean(0)).expand(15, -1), torch.full((5, d), 3.0e38)])
    gram = kernels.centered_gram(m)
    assert gram.wide and gram.center < 50  # centred inside the honest bulk
    x = m.double() - m.double()[gram.center]
    assert torch.allclose(gram.matrix, x @ x.T, rtol=1e-13, atol=1e-13 * float((x[:50] ** 2).sum(1).max()))
    d2 = kernels.squared_distances(gram)
    assert bool((d2[50:65, 50:65] == 0).all()) and float(d2[:50, :50].sum()) > 0
    got = GeometricMedian()(m[:65]).vector.double()
    spread = float((honest - honest.mean(0)).norm(dim=1).mean())  # 0.0067 at |m| ~ 5: float32 rounds at 3e-7
    assert float((got - ref_weiszfeld(m[:65].double(), tol=1e-12, max_iter=10_000)).norm()) <= 1e-3 * spread


# -- validation ---------------------------------------------------------------------------------------
def test_invalid_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match=r"krum f .* must be >= 0, got -1"):
        Krum(-1)
    with pytest.raises(ValueError, match="must be an integer"):
        TrimmedMean(1.5)
    with pytest.raises(ValueError, match="gm tol must be a positive number"):
        GeometricMedian(tol=0)
    with pytest.raises(ValueError, match="choose one of: standard, lower"):
        Median("upper")
    with pytest.raises(ValueError, match="choose one of: previous, median, mean, zero"):
        CenteredClipping(init="origin")
    with pytest.raises(AggregationError, match=r"krum needs at least 9 messages \(n > 2f \+ 2 with f = 3\), got 8"):
        Krum(3)(torch.randn(8, 4))
    with pytest.raises(AggregationError, match=r"bulyan needs at least 15 messages \(n >= 4f \+ 3 with f = 3\)"):
        Bulyan(3)(torch.randn(14, 4))
    with pytest.raises(AggregationError, match=r"trimmed-mean needs at least 7 messages"):
        TrimmedMean(3)(torch.randn(6, 4))
    with pytest.raises(ValueError, match="choose one of"):
        make_rule("nope")
    with pytest.raises(ValueError, match="pre-aggregator='xyz' is not valid"):
        make_rule("mean", pre="xyz")


def test_rules_reject_bad_input():
    with pytest.raises(AggregationError, match=r"must be \(n, d\)"):
        Mean()(torch.ones(3))
    with pytest.raises(AggregationError, match="needs at least 1 messages"):
        Mean()(torch.ones(0, 4))
    with pytest.raises(AggregationError, match="floating point"):
        Mean()(torch.ones(2, 2, dtype=torch.int64))


def test_make_rule_passes_f_where_the_rule_takes_it():
    assert make_rule("krum", f=4).f == 4 and make_rule("bulyan", f=2).min_messages() == 11
    assert isinstance(make_rule("gm", f=4, tol=1e-6), GeometricMedian)
    assert make_rule("multi-krum", f=2, m=3).m == 3


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_small_exhaustive_permutations(rule):
    m = torch.randn(max(rule.min_messages(), 6), 5, generator=_gen(11), dtype=torch.float64)
    base = rule(m).vector
    for perm in itertools.islice(itertools.permutations(range(len(m))), 0, 30, 7):
        assert torch.allclose(rule(m[list(perm)]).vector, base, atol=1e-9)


def test_a_rule_runs_the_host_blas_on_one_thread_and_gives_it_back():
    """Host products are small: a multi-threaded BLAS only waits for its helper thread (on a busy
    machine, ms per call). The numbers do not depend on the thread count."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    from strategies.aggregators import GeometricMedian

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    seen = []

    class Probe(GeometricMedian):
        def aggregate(self, messages):
            seen.append(blas_threads())
            return super().aggregate(messages)

    messages = torch.randn(70, 108, generator=torch.Generator().manual_seed(0))
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        out = Probe()(messages)
        assert blas_threads() == before == [2] * len(before) and len(before) >= 1
        assert seen == [[1] * len(before)]
        x = np.random.default_rng(0).normal(size=(70, 108))
        two = x @ x.T
    with threadpool_limits(limits=1, user_api="blas"):
        assert np.array_equal(x @ x.T, two)
        assert torch.equal(GeometricMedian()(messages).vector, out.vector)


def test_without_threadpoolctl_a_rule_leaves_the_blas_alone_with_the_same_numbers(monkeypatch):
    """threadpoolctl is a dependency, but a rule must not need it: without it the products run on
    whatever threads the BLAS has, and the numbers are the same."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from strategies import kernels
    from strategies.aggregators import GeometricMedian

    messages = torch.randn(70, 108, generator=torch.Generator().manual_seed(1))
    limited = GeometricMedian()(messages).vector
    monkeypatch.setattr(kernels, "ThreadpoolController", None)
    seen = []

    class Probe(GeometricMedian):
        def aggregate(self, messages):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
            return super().aggregate(messages)

    with threadpool_limits(limits=2, user_api="blas"):
        out = Probe()(messages).vector
    assert seen and all(n == 2 for n in seen[0])
    assert torch.equal(out, limited)
