"""The rules added beside the paper's (issue 14): Meamed, CGE, MDA and DnC, each against its
paper's definition written plainly, by hand, by its defining property, and at the extremes."""

import itertools
import math
import time

import numpy as np
import pytest
import torch

from strategies.aggregators import CGE, MDA, NNM, AggregationError, DnC, Krum, Meamed, make_rule
from strategies.aggregators import _mix as mix_seed


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- plain float64 references ----------------------------------------------------------------------
def ref_median(m):
    s, n = m.sort(dim=0).values, len(m)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def ref_meamed(m, f):
    closest = (m - ref_median(m)).abs().argsort(dim=0, stable=True)[: len(m) - f]
    return torch.gather(m, 0, closest).mean(0)


def ref_cge(m, f):
    return m[m.norm(dim=1).argsort(stable=True)[: len(m) - f]].mean(0)


def ref_mda(m, f):
    d = torch.cdist(m, m)
    best = min(itertools.combinations(range(len(m)), len(m) - f), key=lambda s: float(d[list(s)][:, list(s)].max()))
    return m[list(best)].mean(0)


def ref_dnc(m, f, dim, iterations, c, seed, call=0):
    """Shejwalkar and Houmansadr 2021, Alg. 2, with numpy's SVD (coordinates drawn as the rule draws)."""
    g = torch.Generator().manual_seed(mix_seed(seed, call))
    good = set(range(len(m)))
    for _ in range(iterations):
        coords = torch.randperm(m.shape[1], generator=g)[:dim]
        sub = m[:, coords].double().numpy()
        centred = sub - sub.mean(axis=0)
        v = np.linalg.svd(centred, full_matrices=False)[2][0]
        scores = (centred @ v) ** 2
        good -= set(np.argsort(-scores, kind="stable")[: math.floor(c * f)].tolist())
    return m[sorted(good)].double().mean(0)


def _messages(n_honest=16, n_bad=4, d=12, seed=0):
    g = _gen(seed)
    honest = torch.randn(n_honest, d, generator=g, dtype=torch.float64) + 2.0
    bad = 40.0 + 5.0 * torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, bad]), honest


# -- by hand ---------------------------------------------------------------------------------------
def test_hand_cases():
    m = torch.tensor([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0], [100.0, -50.0]], dtype=torch.float64)
    # Meamed, f = 1: per coordinate the 4 values nearest the median (2, 12): 0..3 and 10..13
    assert Meamed(1)(m).vector.tolist() == [1.5, 11.5]
    # CGE, f = 2: the 3 smallest norms are rows 0, 1, 2
    assert CGE(2)(m).vector.tolist() == [1.0, 11.0]
    # MDA, f = 1: without row 4 the diameter is |(3, 13) - (0, 10)| = sqrt(18); any subset with row 4 is larger
    out = MDA(1)(m)
    assert out.vector.tolist() == [1.5, 11.5] and out.info["diameter"] == pytest.approx(math.sqrt(18))
    # DnC, f = 1: the outlier dominates the top singular direction and is dropped
    assert DnC(1, dim=2, iterations=1)(m).vector.tolist() == [1.5, 11.5]


# -- against the plain references ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rules_match_their_plain_references(dtype):
    m, _ = _messages(seed=1)
    m = m.to(dtype)
    w = m.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(Meamed(4)(m).vector.double(), ref_meamed(w, 4), atol=tol)
    assert torch.allclose(CGE(4)(m).vector.double(), ref_cge(w, 4), atol=tol)
    small = m[:12]  # C(12, 3) subsets for the brute force
    assert torch.allclose(MDA(3)(small).vector.double(), ref_mda(small.double(), 3), atol=tol)
    rule = DnC(4, dim=7, iterations=3, c=1.5, seed=9)
    for call in range(3):  # the coordinates change from call to call, as the reference's
        assert torch.allclose(rule(m).vector.double(), ref_dnc(w, 4, 7, 3, 1.5, 9, call), atol=tol)


def test_defining_properties():
    m, _ = _messages(n_honest=9, n_bad=3, d=5, seed=2)
    d = torch.cdist(m, m)
    rule = MDA(3)
    alpha, info = rule.coefficients(__import__("strategies").kernels.centered_gram(m))
    kept = [i for i in range(len(m)) if alpha[i] > 0]
    diam = float(d[kept][:, kept].max())
    assert len(kept) == 9 and info["diameter"] == pytest.approx(diam)
    assert all(float(d[list(s)][:, list(s)].max()) >= diam - 1e-12 for s in itertools.combinations(range(12), 9))
    # CGE: every kept message is no longer than every dropped one
    norms = m.norm(dim=1)
    out = CGE(3)(m)
    kept_norm = out.info["largest_kept_norm"]
    assert int((norms <= kept_norm).sum()) == 9 and float(norms.sort().values[9]) > kept_norm
    # Meamed with f = 0 is the mean
    assert torch.allclose(Meamed(0)(m).vector, m.mean(0))


@pytest.mark.parametrize(
    "rule", [Meamed(4), CGE(4), MDA(2), DnC(4, dim=5, iterations=2), NNM(CGE(4), 4)], ids=lambda r: r.name
)
def test_permutation_invariance_and_robustness(rule):
    m, honest = _messages(seed=3)
    if isinstance(rule, MDA):
        m, honest = _messages(n_honest=10, n_bad=2, seed=3)
    perm = torch.randperm(len(m), generator=_gen(4))
    rule.reset()
    a = rule(m).vector
    rule.reset()
    b = rule(m[perm]).vector
    assert torch.allclose(a, b, atol=1e-10)
    lo, hi = honest.min(0).values, honest.max(0).values
    assert bool(((a >= lo) & (a <= hi)).all())  # outliers at 40 +- 5 move no coordinate outside the honest range


def test_validation_and_costs_are_stated_before_any_work():
    with pytest.raises(ValueError, match=r"meamed f .* must be >= 0"):
        Meamed(-1)
    with pytest.raises(ValueError, match="dnc c must be a positive number"):
        DnC(2, c=0)
    with pytest.raises(AggregationError, match=r"meamed needs at least 7 messages \(n > 2f with f = 3\)"):
        Meamed(3)(torch.randn(6, 2))
    big = torch.randn(70, 3)
    start = time.perf_counter()
    with pytest.raises(AggregationError, match=r"C\(n, f\) = 1.62e\+17 subsets to score, more than max-subsets"):
        MDA(20)(big)
    assert time.perf_counter() - start < 0.1  # refused, not attempted
    assert make_rule("mda", f=2, max_subsets=10).max_subsets == 10


def test_the_run_config_checks_mda_cost_and_builds_dnc_with_the_run_seed():
    from byzflower.config import ConfigError, resolve, rule_of

    with pytest.raises(ConfigError, match="mda"):
        resolve({"aggregator": "mda", "num-honest": 50, "num-byzantine": 20})
    cfg = resolve({"aggregator": "dnc", "seed": 5, "dnc-iters": 2, "num-honest": 10, "num-byzantine": 3})
    rule = rule_of(cfg)
    assert (rule.seed, rule.iterations, rule.f) == (5, 2, 3)
    state = rule.state_dict()
    rule(torch.randn(13, 4))
    assert int(rule.state_dict()["calls"]) == 1 and int(state["calls"]) == 0


# -- extremes of float32 for MDA (the n of test_extremes is beyond its exact cost) ------------------------
@pytest.mark.parametrize("name", ["mda", "smea"])
@pytest.mark.parametrize("scale", [1e20, 3.4e38])
def test_mda_at_the_extremes_of_float32(scale, name):
    g = _gen(5)
    honest = (0.3 + 0.01 * torch.randn(11, 64, generator=g, dtype=torch.float64)).float()
    bad = torch.cat([torch.full((2, 64), scale), -torch.full((1, 64), scale)]).float()
    m = torch.cat([honest, bad])[torch.randperm(14, generator=g)]
    out = make_rule(name, f=3)(m).vector
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.allclose(out.double(), honest.double().mean(0), atol=1e-6)


# -- pre-aggregators: bucketing, static clipping, ARC -----------------------------------------------------
def ref_buckets(m, s, seed, call=0):
    """Karimireddy et al. 2022: shuffle (as the rule draws), then the means of consecutive groups of s."""
    order = torch.randperm(len(m), generator=torch.Generator().manual_seed(mix_seed(seed, call)))
    return torch.stack([m[order[i : i + s]].double().mean(0) for i in range(0, len(m), s)])


def ref_clip(m, limit):
    return torch.stack([row * min(1.0, limit / float(row.norm())) for row in m.double()])


def ref_arc(m, f):
    n = len(m)
    k = math.floor(2 * (f / n) * (n - f))
    norms = sorted((float(r.norm()) for r in m.double()), reverse=True)
    return ref_clip(m, norms[k]) if k else m.double()


@pytest.mark.parametrize("rule_name", ["gm", "median"])  # a Gram rule (mixed Gram matrix) and a row rule
def test_pre_aggregators_match_their_plain_references(rule_name):
    from strategies.aggregators import ARC, Bucketing, Clipping, GeometricMedian, Median

    m, _ = _messages(n_honest=17, n_bad=4, d=9, seed=6)
    inner = GeometricMedian(tol=1e-12, max_iter=2000) if rule_name == "gm" else Median()
    rule = Bucketing(inner, s=3, seed=4)
    for call in range(2):
        assert torch.allclose(rule(m).vector, inner(ref_buckets(m, 3, 4, call)).vector, atol=1e-8)
    assert int(rule.state_dict()["calls"]) == 2
    assert torch.allclose(Clipping(inner, 5.0)(m).vector, inner(ref_clip(m, 5.0)).vector, atol=1e-8)
    assert torch.allclose(ARC(inner, 4)(m).vector, inner(ref_arc(m, 4)).vector, atol=1e-8)


def test_pre_aggregators_by_hand_and_by_property():
    from strategies.aggregators import ARC, Bucketing, Clipping, Mean

    m = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0], [6.0, 8.0]], dtype=torch.float64)
    # clipping at 5: (3, 4) kept, (0, 1) kept, (30, 40) -> (3, 4), (6, 8) -> (3, 4)
    assert Clipping(Mean(), 5.0)(m).vector.tolist() == [2.25, 3.25]
    # ARC, f = 1, n = 4: k = floor(2 * 1/4 * 3) = 1; the largest (norm 50) is clipped to the next (norm 10)
    assert ARC(Mean(), 1)(m).vector.tolist() == [3.75, 5.25]
    # bucketing: s = 1 or s = n changes nothing for the mean; the buckets' sizes follow ceil(n / s)
    assert torch.allclose(Bucketing(Mean(), 1)(m).vector, m.mean(0))
    assert torch.allclose(Bucketing(Mean(), 4)(m).vector, m.mean(0))
    assert Bucketing(Mean(), 3).min_messages() == 1 and Bucketing(Krum(2), 2).min_messages() == 13
    rule = Bucketing(Mean(), 2, seed=1)
    first = rule(m).vector
    rule.reset()
    assert torch.equal(rule(m).vector, first)  # the draw is (seed, call number): reset replays it


def test_pre_aggregators_compose_from_run_config():
    from byzflower.config import ConfigError, resolve, rule_of
    from strategies.aggregators import ARC, NNM, Bucketing, GeometricMedian

    rule = rule_of(resolve({"aggregator": "gm", "pre-aggregator": "bucketing,nnm", "bucket-size": 3, "seed": 8}))
    assert isinstance(rule, Bucketing) and isinstance(rule.rule, NNM) and isinstance(rule.rule.rule, GeometricMedian)
    assert (rule.s, rule.seed, rule.name) == (3, 8, "bucketing+nnm+gm")
    arc = rule_of(resolve({"aggregator": "median", "pre-aggregator": "arc", "aggregator-f": 4}))
    assert isinstance(arc, ARC) and arc.f == 4
    with pytest.raises(ConfigError, match=r"pre-aggregator.*nnm, bucketing, clipping, arc"):
        resolve({"pre-aggregator": "bucketing,xyz"})
    with pytest.raises(ConfigError, match="clip-threshold"):
        resolve({"pre-aggregator": "clipping", "clip-threshold": 0})
    # the state of every layer survives a checkpoint
    rule = make_rule("centered-clipping", pre="bucketing,nnm", f=2, init="zero")
    rule(torch.randn(12, 3, dtype=torch.float64))
    state = rule.state_dict()
    again = make_rule("centered-clipping", pre="bucketing,nnm", f=2, init="zero")
    again.load_state_dict(state)
    m = torch.randn(12, 3, dtype=torch.float64)
    assert torch.equal(again(m).vector, rule(m).vector)


@pytest.mark.parametrize("pre", ["bucketing", "clipping", "arc"])
@pytest.mark.parametrize("scale", [1e20, 3.4e38])
def test_pre_aggregators_at_the_extremes_of_float32(pre, scale):
    g = _gen(7)
    honest = (0.3 + 0.01 * torch.randn(60, 64, generator=g, dtype=torch.float64)).float()
    bad = torch.cat([torch.full((10, 64), scale), -torch.full((4, 64), scale)]).float()
    m = torch.cat([honest, bad])[torch.randperm(74, generator=g)]
    centre = honest.double().mean(0)
    for name in ("gm", "median"):
        out = make_rule(name, f=14, pre=pre, seed=1)(m).vector
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), (pre, name)
        if pre == "clipping":  # every message clipped to norm 1 (honest ones too: norm 2.4): so is the result
            assert float(out.double().norm()) <= 1.0 + 1e-6
        else:
            # at the honest scale, not the attackers' (a bucket of +scale and -scale averages to 0, a
            # plausible point that pulls the rule: that is bucketing's known cost)
            assert float((out.double() - centre).norm()) <= float(centre.norm()), (pre, name)


def ref_smea(m, f):
    """Allouah et al. 2023: the n - f subset whose covariance's largest eigenvalue is smallest."""

    def top(subset):
        x = m[list(subset)]
        centred = x - x.mean(0)
        return float(torch.linalg.eigvalsh(centred.T @ centred / len(x))[-1])

    best = min(itertools.combinations(range(len(m)), len(m) - f), key=top)
    return m[list(best)].mean(0), top(best)


def test_smea_matches_its_plain_reference_and_shares_the_subset_rules_checks():
    from strategies.aggregators import SMEA

    m, _ = _messages(n_honest=9, n_bad=3, d=6, seed=8)
    out = SMEA(3)(m)
    want, top = ref_smea(m, 3)
    assert torch.allclose(out.vector, want, atol=1e-10)
    assert out.info["max_eigenvalue"] == pytest.approx(top, rel=1e-8)
    assert (out.weights[9:] == 0).all()  # the three far messages are the ones left out
    with pytest.raises(AggregationError, match=r"smea: n = 70, f = 20 means C\(n, f\) = 1.62e\+17"):
        SMEA(20)(torch.randn(70, 3))
    # both exact subset rules read one key
    from byzflower.config import KEYS

    assert KEYS["max-subsets"].default == 200_000 and KEYS["max-subsets"].help.startswith("mda, smea:")


def ref_clipped_clustering(m):
    """Li et al. 2023 written plainly: clip to the median norm; average-linkage clusters by cosine
    distance, merged until two remain (each merge re-averaging the original distances); the mean
    of the larger cluster."""
    norms = m.norm(dim=1)
    limit = norms.median()
    clipped = torch.stack([row * min(1.0, float(limit / nrm)) for row, nrm in zip(m, norms, strict=True)])
    unit = m / norms[:, None]
    dist = 1 - unit @ unit.T
    clusters = [[i] for i in range(len(m))]
    while len(clusters) > 2:
        pairs = itertools.combinations(range(len(clusters)), 2)
        a, b = min(pairs, key=lambda p: float(dist[clusters[p[0]]][:, clusters[p[1]]].mean()))
        clusters[a] += clusters.pop(b)
    return clipped[max(clusters, key=len)].mean(0)


def test_clipped_clustering_against_its_plain_reference_by_hand_and_at_the_extremes():
    from strategies.aggregators import ClippedClustering

    m, _ = _messages(n_honest=11, n_bad=4, d=7, seed=9)
    m[11:] *= -1  # the attackers point the other way: cosines separate them (a shared direction would not)
    out = ClippedClustering()(m)
    assert torch.allclose(out.vector, ref_clipped_clustering(m), atol=1e-10)
    assert out.info["cluster_size"] == 11 and out.weights[11:].sum() == 0
    same_way, _ = _messages(n_honest=11, n_bad=4, d=7, seed=9)
    assert torch.allclose(ClippedClustering()(same_way).vector, ref_clipped_clustering(same_way), atol=1e-10)
    perm = torch.randperm(15, generator=_gen(2))
    assert torch.allclose(ClippedClustering()(m[perm]).vector, out.vector, atol=1e-10)
    # by hand: (1, 0) twice and (0, 1) once; the median norm is 1, so only (3, 0) is clipped to (1, 0)
    hand = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert ClippedClustering()(hand).vector.tolist() == [1.0, 0.0]
    for scale in (1e20, 3.4e38):
        g = _gen(3)
        good = (0.3 + 0.01 * torch.randn(12, 64, generator=g, dtype=torch.float64)).float()
        bad = -torch.full((4, 64), scale).float()
        both = torch.cat([good, bad])
        got = ClippedClustering()(both).vector
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        assert torch.allclose(got.double(), ref_clipped_clustering(both.double()), atol=1e-6)  # the good ones, clipped


def test_signguard_filters_by_norm_and_by_sign_statistics():
    from strategies.aggregators import SignGuard, _mean_shift

    g = _gen(5)
    honest = torch.randn(14, 400, generator=g, dtype=torch.float64) + 0.5  # ~69% positive entries each
    flipped = -honest[:3].clone()  # same norms, ~31% positive: caught by the sign statistics
    huge = 50 * honest[3:5].clone()  # same signs, 50x the norm: caught by the norm filter
    m = torch.cat([honest, flipped, huge])
    out = SignGuard(fraction=0.5, seed=2)(m)
    assert out.info["kept"] == 14 and out.weights[14:].sum() == 0
    norms = honest.norm(dim=1)
    clipped = honest * torch.clamp(m.norm(dim=1).median() / norms, max=1.0)[:, None]
    assert torch.allclose(out.vector, clipped.mean(0), atol=1e-10)  # the kept ones, clipped to the median norm
    perm = torch.randperm(19, generator=_gen(6))
    assert torch.allclose(SignGuard(fraction=0.5, seed=2)(m[perm]).vector, out.vector, atol=1e-10)
    # mean shift by hand: two tight groups and a lone point -> three labels, the groups' members together
    pts = np.array([[0.0, 0, 0], [0.01, 0, 0], [0.0, 0.01, 0], [1.0, 1, 1], [1.01, 1, 1], [1.0, 1.01, 1], [5.0, 5, 5]])
    labels = _mean_shift(pts)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:6])) == 1 and len({labels[0], labels[3], labels[6]}) == 3
    for scale in (1e20, 3.4e38):
        bad = torch.full((3, 400), -scale, dtype=torch.float64)
        got = SignGuard()(torch.cat([honest, bad]).float()).vector
        assert bool(torch.isfinite(got).all()) and float((got.double() - honest.mean(0)).abs().max()) < 1.0
    with pytest.raises(ValueError, match="signguard fraction must be <= 1"):
        SignGuard(fraction=2.0)


def test_a_pre_aggregator_checks_its_rule_on_the_rows_the_rule_will_receive():
    """MDA's cost is C(rows, f) of what reaches it: 60 messages refused, their 20 buckets of 3 accepted."""
    from byzflower.config import ConfigError, resolve

    base = {"aggregator": "mda", "aggregator-f": 4, "num-honest": 56, "num-byzantine": 4}
    with pytest.raises(ConfigError, match=r"C\(n, f\) = 4.88e\+05"):
        resolve(base)
    assert resolve({**base, "pre-aggregator": "bucketing", "bucket-size": 3})["bucket-size"] == 3
    with pytest.raises(AggregationError, match=r"C\(n, f\) = 4.88e\+05"):
        make_rule("mda", f=4, pre="nnm")(torch.randn(60, 3))
    assert make_rule("mda", f=4, pre="bucketing", s=3)(torch.randn(60, 3, dtype=torch.float64)).weights.sum() == (
        pytest.approx(1.0)
    )


# -- CAF and MoNNA --------------------------------------------------------------------------------------
def ref_caf(m, f):
    """Allouah et al. 2025 written in d-space: the weighted covariance's top eigenpair is the top
    right singular pair of the weighted, centred data (numpy's SVD; no Gram matrix)."""
    x = m.double().numpy()
    n = len(x)
    c, best, out = np.ones(n), math.inf, x.mean(0)
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * x).sum(0) / c.sum()
        y = x - mu
        _, sigma, vt = np.linalg.svd(np.sqrt(c / c.sum())[:, None] * y, full_matrices=False)
        if sigma[0] ** 2 < best:
            best, out = sigma[0] ** 2, mu
        tau = (y @ vt[0]) ** 2
        c = np.where(c > 0, c * np.clip(1 - tau / tau[c > 0].max(), 0, 1), 0)
    return torch.from_numpy(out), best


def ref_monna(m, f, pivot_row):
    return m[(m - m[pivot_row]).norm(dim=1).argsort(stable=True)[: len(m) - f]].mean(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_caf_and_monna_match_their_plain_references(dtype):
    from strategies.aggregators import CAF, MoNNA

    m, _ = _messages(seed=6)
    m = m.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for f in (0, 2, 4, 6):
        want, top = ref_caf(m, f)
        out = CAF(f)(m)
        assert torch.allclose(out.vector.double(), want, atol=tol), f
        if f:
            assert out.info["max_eigenvalue"] == pytest.approx(top, rel=1e-4 if dtype == torch.float32 else 1e-9)
    workers = torch.randperm(len(m), generator=_gen(7)).tolist()  # row i is worker workers[i]
    rule = MoNNA(4, pivot=5)
    rule.label_rows(workers)
    out = rule(m)
    assert torch.allclose(out.vector.double(), ref_monna(m.double(), 4, workers.index(5)), atol=tol)
    assert out.weights[workers.index(5)] == pytest.approx(1 / 16)


def test_caf_and_monna_by_hand_and_by_property():
    from strategies.aggregators import CAF, MoNNA

    # CAF, f = 1: the far row (100, 0) carries the covariance's top direction and is filtered out first
    m = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [100.0, 0.0]], dtype=torch.float64)
    out = CAF(1)(m)
    assert out.weights[4] == 0.0 and float(out.vector.norm()) < 0.01
    # defining property: the result is the weighted mean with the smallest top eigenvalue the filter
    # met, below the unfiltered covariance's, and reported as such
    m, _ = _messages(seed=8)
    out = CAF(4)(m)
    w = out.weights
    mu = torch.from_numpy(w) @ m
    cov = ((m - mu) * torch.from_numpy(w)[:, None]).T @ (m - mu)
    assert torch.allclose(out.vector, mu, atol=1e-12)
    assert float(torch.linalg.eigvalsh(cov)[-1]) == pytest.approx(out.info["max_eigenvalue"], rel=1e-9)
    assert out.info["max_eigenvalue"] < float(torch.linalg.eigvalsh(torch.cov(m.T, correction=0))[-1])
    assert w[16:].sum() == 0.0  # the four outliers at 40 +- 5 hold no weight
    # MoNNA: the pivot is always kept, and the kept rows are the n - f nearest to it
    rule = MoNNA(4, pivot=0)
    rule.label_rows(list(range(20)))
    out = rule(m)
    d = (m - m[0]).norm(dim=1)
    kept = out.weights > 0
    assert kept[0] and kept.sum() == 16 and float(d[kept].max()) <= float(d[~kept].min())
    assert out.info["radius"] == pytest.approx(float(d[kept].max()))


@pytest.mark.parametrize("name", ["caf", "monna"])
def test_caf_and_monna_are_permutation_invariant_and_robust(name):
    m, honest = _messages(seed=9)
    perm = torch.randperm(len(m), generator=_gen(10))
    rule = make_rule(name, f=4)
    rule.label_rows(list(range(len(m))))  # worker i at row i (the pivot, worker 0, is honest)
    a = rule(m).vector
    rule.label_rows(perm.tolist())  # row i of m[perm] is worker perm[i]
    b = rule(m[perm]).vector
    assert torch.allclose(a, b, atol=1e-10)
    assert float((a - honest.mean(0)).norm()) <= float((honest - honest.mean(0)).norm(dim=1).max())


def test_monna_without_its_pivot_fails_the_round_and_says_why():
    from strategies.aggregators import MoNNA
    from strategies.step import server_step

    m, _ = _messages(seed=11)
    point = torch.zeros(m.shape[1], dtype=torch.float64)
    rule = MoNNA(4, pivot=3)
    for workers in (None, [w for w in range(20) if w != 3] + [99]):  # unknown rows; the pivot dropped
        out = server_step(point, m, rule, 0.1, workers)
        assert out.failed and out.reason == "rule-error" and "worker 3" in out.failure
        assert torch.equal(out.point, point)
    out = server_step(point, m, rule, 0.1, list(range(20)))
    assert not out.failed and out.weights[3] > 0
    assert server_step(point, m, rule, 0.1).failed  # labels hold for one call only


def test_monna_is_refused_where_no_row_stands_for_its_pivot():
    from byzflower.config import ConfigError, resolve
    from strategies.robust_fedavg import RobustFedAvg

    base = {"aggregator": "monna", "num-honest": 10, "num-byzantine": 3}
    assert resolve({**base, "monna-pivot": 12, "pre-aggregator": "nnm"})["monna-pivot"] == 12
    with pytest.raises(ConfigError, match=r"monna-pivot=13 is not a worker of this run; choose 0..12"):
        resolve({**base, "monna-pivot": 13})
    with pytest.raises(ConfigError, match="bucketing cannot stand in front of monna"):
        resolve({**base, "pre-aggregator": "bucketing"})
    with pytest.raises(ValueError, match="replies are anonymous clients' claims"):
        RobustFedAvg("monna", f=1)


def test_monna_and_caf_in_the_local_engine(tmp_path, mnist):
    """With an honest pivot MoNNA learns under sign-flip; with a Byzantine pivot that sends Inf
    (dropped each round) every round fails, recorded in the metrics, the summary and the log."""
    from byzflower.config import resolve
    from byzflower.engine import run_local

    base = {"num-honest": 10, "num-byzantine": 3, "seed": 2, "num-server-rounds": 60, "eval-every": 30}
    base["results-dir"] = str(tmp_path)
    logged = []
    runs = {
        "monna": {"aggregator": "monna", "attack": "sign-flip"},
        "caf": {"aggregator": "caf", "attack": "sign-flip"},
        "lost-pivot": {"aggregator": "monna", "attack": "inf", "monna-pivot": 11},
    }
    out = {k: run_local(resolve({**base, **v, "run-name": k}), log=logged.append) for k, v in runs.items()}
    for name in ("monna", "caf"):
        assert out[name]["final"]["test_accuracy"] > 0.6, name
        assert out[name]["totals"].get("failed", 0) == 0
    lost = out["lost-pivot"]
    assert lost["totals"]["failed"] == 60 and lost["totals"]["failed_rule_error"] == 60
    assert any("not among the" in line and "worker 11" in line for line in logged)
    assert any("60 round(s) failed" in w for w in lost["warnings"])
    assert any("monna trusts worker 11's message, but worker 11 is Byzantine" in w for w in lost["warnings"])
    assert not any("trusts worker" in w for w in out["monna"]["warnings"])
