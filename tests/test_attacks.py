"""Each attack's defining property on fixed honest messages."""

import pytest
import torch

from byzflower.core import role_blind_order
from clients import attacks
from clients.attacks import ALIE, IPM, Gaussian, HonestStats, LabelFlip, Noise, SignFlip, ZeroGradient, alie_z
from clients.rng import standard_normals
from strategies.aggregators import Mean

D = 2_000


@pytest.fixture
def honest():
    return torch.randn(50, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5


def test_zero_gradient_messages_cancel_the_honest_ones(honest):
    bad = ZeroGradient(20).craft(list(range(50, 70)), 3, HonestStats.of(honest), D)
    everything = torch.cat([honest, bad])
    assert torch.allclose(everything.sum(0), torch.zeros(D, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Mean()(everything).vector, torch.zeros(D, dtype=torch.float64), atol=1e-12)


def test_sign_flip_and_ipm_scale_the_honest_mean(honest):
    stats = HonestStats.of(honest)
    assert torch.allclose(SignFlip(-3.0).craft([50, 51], 1, stats, D), (-3 * honest.mean(0)).expand(2, -1))
    assert torch.allclose(SignFlip(-10.0).craft([50], 1, stats, D)[0], -10 * honest.mean(0))
    assert torch.allclose(IPM(0.1).craft([50, 60], 1, stats, D), (-0.1 * honest.mean(0)).expand(2, -1))


def test_alie_is_mean_minus_z_std(honest):
    z = alie_z(70, 20)
    assert z == pytest.approx(0.7437, abs=1e-3)  # s = 36 - 20 = 16, Phi^-1(54 / 70)
    out = ALIE(z).craft([50, 51, 52], 1, HonestStats.of(honest), D)
    ref = honest.mean(0) - z * honest.std(0)
    assert torch.allclose(out, ref.expand(3, -1))
    with pytest.raises(ValueError, match="undefined"):
        alie_z(4, 3)


def test_gaussian_noise_has_the_right_mean_and_std_and_is_seeded(honest):
    stats = HonestStats.of(honest)
    atk = Gaussian(std=30.0, seed=5)
    out = atk.craft(list(range(50, 70)), 7, stats, D)
    noise = (out - honest.mean(0)) / 30.0
    assert abs(float(noise.mean())) < 0.01  # 40,000 draws: standard error 0.005
    assert abs(float(noise.std()) - 1.0) < 0.01
    assert torch.equal(out, atk.craft(list(range(50, 70)), 7, stats, D))
    assert not torch.equal(out, atk.craft(list(range(50, 70)), 8, stats, D))
    # a worker's draw does not depend on who else is crafted with it
    assert torch.equal(out[3], atk.craft([53], 7, stats, D)[0])


def test_counter_based_normals_are_standard_normal_and_keyed_by_seed_stream_and_counter():
    streams = torch.tensor([3, 50, 51, 69])
    x = standard_normals(7, streams, "gaussian/12", 100_001).double()  # odd: the last pair is cut
    assert x.shape == (4, 100_001) and x.dtype == torch.float64 and bool(torch.isfinite(x).all())
    flat = x.reshape(-1)
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1.0) < 0.005  # se 0.0016, 0.0011
    assert abs(float((flat**3).mean())) < 0.02 and abs(float((flat**4).mean()) - 3.0) < 0.05  # skew, kurtosis
    assert float(flat.abs().max()) <= 5.78  # u1 >= 2^-24
    # Kolmogorov-Smirnov against N(0, 1), 400,004 draws: the 1% critical value is 1.63 / sqrt(n)
    ordered = flat.sort().values
    cdf = 0.5 * (1 + torch.erf(ordered / 2**0.5))
    ks = float(((torch.arange(1, len(ordered) + 1, dtype=torch.float64) / len(ordered)) - cdf).abs().max())
    assert ks < 1.63 / len(ordered) ** 0.5
    # rows, and the two halves of a row (cosines, sines), are uncorrelated
    assert abs(float(torch.corrcoef(x[:, :50_000])[0, 1:].abs().max())) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([x[0, :50_000], x[0, 50_001:]]))[0, 1])) < 0.02
    # a row depends on its own (seed, stream, counter) only
    assert torch.equal(standard_normals(7, streams[1:2], "gaussian/12", 100_001)[0], x[1].float())
    assert not torch.equal(standard_normals(7, streams, "gaussian/13", 100_001), x.float())
    assert not torch.equal(standard_normals(8, streams, "gaussian/12", 100_001), x.float())


def test_noise_drawn_inline_is_the_noise_drawn_ahead(honest, monkeypatch):
    """A GPU draws noise by kernels in its stream, a CPU ahead of time on a pool thread: same numbers."""
    stats = HonestStats.of(honest)
    ahead = Gaussian(std=30.0, seed=5)
    ahead.prefetch(list(range(50, 70)), 9, D)
    want = ahead.craft(list(range(50, 70)), 9, stats, D)
    noise = Noise(std=2.0, seed=5).craft([1, 2], 3, None, D)
    monkeypatch.setattr(attacks, "draws_inline", lambda device: True)
    inline = Gaussian(std=30.0, seed=5)
    inline.prefetch(list(range(50, 70)), 9, D)  # nothing to start: drawn when crafted
    assert torch.equal(inline.craft(list(range(50, 70)), 9, stats, D), want)
    assert torch.equal(Noise(std=2.0, seed=5).craft([1, 2], 3, None, D), noise)


def test_noise_knows_nothing():
    atk = Noise(std=2.0, seed=1)
    assert not atk.omniscient
    out = atk.craft([0, 1, 2, 3, 4], 1, None, 20_000)
    assert abs(float(out.mean())) < 0.02 and abs(float(out.std()) - 2.0) < 0.02


def test_label_flip_flips_labels():
    assert LabelFlip(10).flip(torch.arange(10)).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


def test_omniscient_attacks_need_statistics():
    with pytest.raises(ValueError, match="omniscient"):
        SignFlip().craft([1], 1, None, D)
    with pytest.raises(ValueError, match="at least one honest message"):
        HonestStats.of(torch.zeros(0, D))


def test_label_flip_workers_hold_flipped_copies_of_honest_data(mnist):
    from byzflower.config import resolve
    from byzflower.factory import byzantine_data, layout_of, worker_data

    cfg = resolve({"num-honest": 5, "num-byzantine": 3, "attack": "label-flip"})
    assert layout_of(cfg).byzantine_ids == (5, 6, 7)
    poisoned = byzantine_data(cfg, mnist, [5, 6, 7], torch.device("cpu"))
    clean = worker_data(cfg, mnist, [0, 1, 2], torch.device("cpu"))
    assert torch.equal(poisoned.inputs, clean.inputs)
    assert torch.equal(poisoned.targets, 9 - clean.targets)


def test_the_strategy_sees_a_seeded_permutation_not_honest_first():
    orders = [role_blind_order(3, t, 70) for t in range(1, 6)]
    assert all(sorted(o) == list(range(70)) for o in orders)
    assert len({tuple(o) for o in orders}) == 5  # a new order every iteration
    for o in orders:
        assert o != list(range(70))
        byzantine_positions = [i for i, w in enumerate(o) if w >= 50]
        assert byzantine_positions != list(range(50, 70))
    assert role_blind_order(3, 2, 70) == orders[1]  # seeded


def test_every_attack_name_builds_its_own_class():
    """No attack name falls through to another attack (clients.attacks.ATTACKS is the registry)."""
    from byzflower.config import ATTACKS, attack_of, resolve
    from clients.attacks import ATTACKS as CLASSES

    assert set(ATTACKS) - {"none"} == set(CLASSES)
    for name in CLASSES:
        assert type(attack_of(resolve({"attack": name}))) is CLASSES[name]
    assert attack_of(resolve({"attack": "none"})) is None


def test_the_inf_attack_is_screened_out_and_the_run_goes_on(tmp_path, mnist):
    """Every Byzantine message is +inf: each is dropped before the rule (counted), no round fails,
    and the model trains on the honest messages alone."""
    import json

    from byzflower.config import resolve
    from byzflower.engine import run_local
    from clients.attacks import Inf

    assert torch.equal(Inf().craft([7, 8], 3, None, 5), torch.full((2, 5), float("inf")))
    cfg = {
        "optimizer": "batch-sgd",
        "aggregator": "gm",
        "attack": "inf",
        "num-honest": 6,
        "num-byzantine": 3,
        "num-server-rounds": 40,
        "eval-every": 20,
        "results-dir": str(tmp_path),
        "run-name": "inf",
    }
    summary = run_local(resolve(cfg), log=lambda _: None)
    assert summary["status"] == "finished"
    assert summary["totals"]["dropped_nonfinite"] == 3 * 40 and not summary["totals"].get("failed")
    assert any("dropped" in w for w in summary["warnings"])
    records = [json.loads(x) for x in (tmp_path / "inf" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"] + 0.3


# -- attacks that see the honest messages themselves (issue 14) ---------------------------------------------
def _bisection_gamma(honest, p, within, gamma=10.0, tau=1e-9):
    """Shejwalkar and Houmansadr 2021, Alg. 1's search for gamma, run to a fine tolerance."""
    mean = honest.mean(0)
    step, best = gamma / 2, 0.0
    while abs(step) > tau:
        if within(mean + gamma * p):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best


def test_minmax_and_minsum_solve_the_papers_constraints_exactly(honest):
    from clients.attacks import MinMax, MinSum

    stats = HonestStats.of(honest)
    d = torch.cdist(honest, honest)
    for kind, p in (("std", -honest.std(0)), ("sign", -torch.sign(honest.mean(0)))):
        mm = MinMax(kind).craft([50, 51], 1, stats, D)
        assert torch.equal(mm[0], mm[1])
        gamma = float((mm[0] - honest.mean(0)).norm() / p.norm())
        # the binding constraint: its farthest honest message is exactly the honest diameter away
        assert float((honest - mm[0]).norm(dim=1).max()) == pytest.approx(float(d.max()), rel=1e-9)
        want = _bisection_gamma(honest, p, lambda m: float((honest - m).norm(dim=1).max()) <= float(d.max()))
        assert gamma == pytest.approx(want, rel=1e-6)
        ms = MinSum(kind).craft([50], 1, stats, D)[0]
        limit = float((d**2).sum(1).max())
        assert float(((honest - ms) ** 2).sum()) == pytest.approx(limit, rel=1e-9)
        want = _bisection_gamma(honest, p, lambda m, limit=limit: float(((honest - m) ** 2).sum()) <= limit)
        assert float((ms - honest.mean(0)).norm() / p.norm()) == pytest.approx(want, rel=1e-6)


def test_mimic_copies_one_honest_worker_every_round_and_attacks_refuse_missing_messages(honest):
    from clients.attacks import Mimic, MinMax

    stats = HonestStats.of(honest)
    assert torch.equal(Mimic(3).craft([50, 51], 7, stats, D), honest[3].expand(2, -1))
    assert torch.equal(Mimic(99).craft([50], 7, stats, D)[0], honest[0])  # that worker missing: the first one
    only_stats = HonestStats(stats.mean, stats.std, stats.count)
    with pytest.raises(ValueError, match="needs the honest messages"):
        MinMax().craft([50], 1, only_stats, D)
    with pytest.raises(ValueError, match="attack-perturbation='up' is not valid; choose one of: std, sign, unit"):
        MinMax("up")


def test_message_attacks_stay_finite_at_the_extremes_of_float32():
    from clients.attacks import MinMax, MinSum

    g = torch.Generator().manual_seed(2)
    honest = (torch.rand(10, 64, generator=g) * 2 - 1) * 3.0e38  # float32 values over its whole range
    for attack in (MinMax("std"), MinMax("unit"), MinSum("sign")):
        out = attack.craft([10], 1, HonestStats.of(honest), 64)
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), attack


def test_optimised_alie_and_ipm_pick_the_grid_value_that_hurts_the_rule_most(honest):
    from byzflower.config import attack_of, resolve
    from clients.attacks import OptimisedALIE, OptimisedIPM
    from strategies.aggregators import CenteredClipping, Median

    stats = HonestStats.of(honest)
    # against the mean the damage grows with the parameter: the largest value of the grid wins
    alie = OptimisedALIE(Mean(), 20)
    alie.craft([50], 1, stats, D)
    assert alie.last_choice == pytest.approx(10.0)
    ipm = OptimisedIPM(Mean(), 20)
    assert torch.allclose(ipm.craft([50], 1, stats, D)[0], -100.0 * honest.mean(0))
    # against the median: the choice is the grid's best, checked by trying every value by hand
    alie = OptimisedALIE(Median(), 20)
    sent = alie.craft([50, 51], 1, stats, D)
    gaps = {
        z: float(
            (Median()(torch.cat([honest, (stats.mean - z * stats.std).expand(20, -1)])).vector - stats.mean).norm()
        )
        for z in OptimisedALIE.GRID
    }
    assert alie.last_choice == max(gaps, key=gaps.get)
    assert torch.allclose(sent[1], stats.mean - alie.last_choice * stats.std)
    # a stateful rule's copy is left as it was: the attacker never moves it
    cc = CenteredClipping(init="previous")
    OptimisedALIE(cc, 20).craft([50], 1, stats, D)
    assert cc.state_dict() == {}
    built = attack_of(resolve({"attack": "ipm-opt", "aggregator": "median", "num-byzantine": 20}))
    assert isinstance(built.rule, Median) and built.num_byzantine == 20


@pytest.mark.parametrize("dim", [108, 4_000])
def test_noise_goes_to_a_thread_only_when_large_and_is_the_same_either_way(dim, monkeypatch):
    """Small draws (a logistic regression's) are made inline: a thread's hand-over costs more than
    they do, and waits for the GIL on a busy machine. Large ones overlap with the honest step."""
    ids = list(range(50, 70))
    honest = torch.randn(50, dim, generator=torch.Generator().manual_seed(3))
    stats = HonestStats.of(honest)

    def crafted(threshold: int) -> torch.Tensor:
        monkeypatch.setattr(attacks, "_THREADED_DRAWS", threshold)
        attacks._PREFETCHED.clear()
        atk = Gaussian(std=30.0, seed=5)
        atk.prefetch(ids, 9, dim)
        assert bool(attacks._PREFETCHED) == (threshold <= len(ids) * dim)
        return atk.craft(ids, 9, stats, dim)

    threaded, inline = crafted(0), crafted(10**12)
    assert torch.equal(threaded, inline) and threaded.shape == (20, dim)
    monkeypatch.undo()
    attacks._PREFETCHED.clear()
    Gaussian(std=30.0, seed=5).prefetch(ids, 9, dim)
    assert bool(attacks._PREFETCHED) == (dim == 4_000)  # the default threshold: 2^16 draws
