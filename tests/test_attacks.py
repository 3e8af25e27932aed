"""Each attack's defining property on fixed honest messages."""

import pytest
import torch

from byzflower.core import role_blind_order
from clients.attacks import ALIE, IPM, Gaussian, HonestStats, LabelFlip, Noise, SignFlip, ZeroGradient, alie_z
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
