"""Detection: the rules' per-row shares, the recorder's suspicion scores and their quality."""

import json

import numpy as np
import pytest
import torch

from byzflower.records.detection import Suspicion, shares_of
from strategies.aggregators import (
    CGE,
    MDA,
    DnC,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    make_rule,
)


def test_suspicion_scores_and_their_quality_by_hand():
    s = Suspicion(4)
    s.observe({0: 0.5, 1: 0.5})  # 2 aggregated: workers 0, 1 at the average share, 2 and 3 left out
    s.observe({0: 0.25, 1: 0.25, 2: 0.5, 3: 0.0})  # 4 aggregated: 3 got nothing, 2 twice the average
    assert s.scores().tolist() == [0.0, 0.0, 0.5, 1.0]
    assert s.quality([3]) == {"detection_precision": 1.0, "detection_auc": 1.0}
    # worker 2 (0.5) is above 0 and 1 but below 3: AUC = (2 + 0) / (2 * 2)... for Byzantine {1, 2}:
    # pairs (1 vs 0): tie 0.5, (1 vs 3): 0, (2 vs 0): 1, (2 vs 3): 0 -> 1.5 / 4
    assert s.quality([1, 2]) == {"detection_precision": 0.5, "detection_auc": 0.375}
    assert s.quality([]) == {} and Suspicion(3).quality([1]) == {}
    again = Suspicion(4)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert again.scores().tolist() == s.scores().tolist()
    # rows -> positions -> workers: row r is the valid_positions[r]-th reply, from worker order[position]
    assert shares_of(np.array([0.7, 0.3]), [1, 3], [9, 8, 7, 6]) == {8: 0.7, 6: 0.3}
    assert shares_of(None, [0], [5]) == {}


@pytest.mark.parametrize(
    "rule",
    [Mean(), GeometricMedian(), Krum(3), MultiKrum(3), CGE(3), MDA(3), DnC(3, dim=8)]
    + [make_rule(r, f=3, pre=p) for r, p in (("gm", "nnm"), ("gm", "bucketing"), ("median", "nnm"), ("krum", "arc"))],
    ids=lambda r: r.name,
)
def test_every_combining_rule_reports_shares_that_sum_to_one_and_leave_outliers_out(rule):
    g = torch.Generator().manual_seed(3)
    honest = torch.randn(13, 8, generator=g, dtype=torch.float64)
    m = torch.cat([honest, 100 + torch.randn(3, 8, generator=g, dtype=torch.float64)])
    out = rule(m)
    if out.weights is None:  # the median behind NNM: per coordinate, no row shares
        assert "median" in rule.name
        return
    w = out.weights
    assert w.shape == (16,) and (w >= 0).all() and w.sum() == pytest.approx(1.0)
    if not isinstance(rule, Mean):
        assert w[13:].sum() < 0.01, rule.name  # the three far rows get (next to) nothing
    # the shares are the aggregate's own coefficients where the rule is a combination of rows
    if isinstance(rule, Mean | Krum | MultiKrum | CGE | MDA | DnC | GeometricMedian):
        assert torch.allclose(torch.from_numpy(w) @ m, out.vector, atol=1e-8)
    assert Median()(m).weights is None


def test_a_run_records_detection_and_draws_it(tmp_path, mnist):
    from byzflower.config import resolve
    from byzflower.engine import run_local

    cfg = resolve(
        {
            "aggregator": "krum",
            "attack": "gaussian",
            "num-honest": 8,
            "num-byzantine": 3,
            "num-server-rounds": 20,
            "eval-every": 10,
            "results-dir": str(tmp_path),
            "run-name": "det",
        }
    )
    final = run_local(cfg, log=lambda _: None)["final"]
    # Krum never picks a Gaussian attacker here: each round the 10 workers it left out have distrust 1
    assert final["detection_precision"] == 1.0 and final["detection_auc"] == 1.0
    assert [s == 1.0 for s in final["suspicion"][8:]] == [True] * 3 and max(final["suspicion"][:8]) < 1.0
    assert (tmp_path / "det" / "suspicion.png").stat().st_size > 10_000
