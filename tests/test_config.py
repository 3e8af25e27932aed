import json
import math
import tomllib
from pathlib import Path

import pytest

from byzflower.config import DEFAULTS, KEYS, MAX_WORKERS, ConfigError, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_mirror_the_schema():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == DEFAULTS


def test_pyproject_has_no_federations_table():
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in KEYS if f"`{k}`" not in readme]
    assert missing == []


def test_defaults_resolve_to_the_paper_setup():
    cfg = resolve({})
    assert cfg["num-honest"] == 50 and cfg["num-byzantine"] == 20 and cfg.num_workers == 70
    assert cfg["attack"] == "gaussian" and cfg["aggregator"] == "gm"  # the paper's headline setting
    assert cfg.lr == 0.1 and cfg.batch_size == 5  # SGD defaults from the paper's notebook
    assert resolve({"optimizer": "batch-sgd"}).batch_size == 50
    assert resolve({"optimizer": "batch-sgd"}).lr == 0.5
    assert resolve({"lr": 0.03, "batch-size": 7}).lr == 0.03


def test_attack_none_leaves_byzantine_workers_out():
    cfg = resolve({"attack": "none", "num-byzantine": 20})
    assert cfg.num_byzantine == 0 and cfg.num_workers == 50


def _problems(overrides):
    with pytest.raises(ConfigError) as info:
        resolve(overrides)
    return str(info.value)


def test_unknown_names_list_the_valid_choices():
    text = _problems({"optimizer": "adam"})
    assert "optimizer='adam'" in text and "sgd, batch-sgd" in text
    assert "model='vgg'" in _problems({"model": "vgg"}) and "mlp, mlp-notebook, cnn" in _problems({"model": "vgg"})
    assert "iid, dirichlet, pathological" in _problems({"partitioner": "shards"})
    assert "mnist, fashion-mnist" in _problems({"dataset": "cifar10"})


def test_planned_choices_say_not_available_yet():
    for key in KEYS.values():
        for name in key.planned:
            if name not in key.choices:
                assert "not available yet" in _problems({key.name: name})


def test_bad_numbers_name_key_value_and_range():
    assert "num-server-rounds=0 is outside the allowed range: an integer > 0" in _problems({"num-server-rounds": 0})
    assert "eval-every=-5 is outside the allowed range: an integer > 0" in _problems({"eval-every": -5})
    assert "lr=-0.1 is outside the allowed range: a finite number >= 0" in _problems({"lr": -0.1})
    assert "batch-size=-1 is outside the allowed range: an integer >= 0" in _problems({"batch-size": -1})
    assert "num-honest=0 must be >= 1" in _problems({"num-honest": 0})
    assert "dirichlet-alpha=0.0 is outside the allowed range: a finite number > 0" in _problems(
        {"dirichlet-alpha": 0.0}
    )
    assert "attack-std=1e+38 is outside the allowed range: a finite number >= 0 and <= 1e+37" in _problems(
        {"attack-std": 1e38}
    )


FLOAT_KEYS = [k for k in KEYS.values() if k.kind is float]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_KEYS, ids=lambda k: k.name)
def test_no_number_key_accepts_nan_or_inf(key, value):
    text = _problems({key.name: value})
    assert f"{key.name}={value!r} is outside the allowed range: a finite number" in text


@pytest.mark.parametrize("key", [k for k in KEYS.values() if k.maximum is not None], ids=lambda k: k.name)
def test_every_declared_maximum_is_enforced(key):
    past = key.maximum * 10 if key.kind is float else int(key.maximum) + 1
    assert f"{key.name}={past!r} is outside the allowed range" in _problems({key.name: past})
    at_most = {"seed": {"seed": 2**63 - 1}, "num-honest": {"num-honest": MAX_WORKERS, "attack": "none"}}
    resolve(
        at_most.get(key.name, {key.name: key.kind(key.maximum)})
        | ({"num-honest": 1} if key.name == "num-byzantine" else {})
    )


@pytest.mark.parametrize("key", ["num-honest", "num-byzantine"])
@pytest.mark.parametrize("value", [2**31, 2**63 - 1, 10**40])
def test_worker_counts_past_what_a_run_takes_are_refused_up_front(key, value):
    # these raised TypeError / RuntimeError from a torch allocation inside resolve before
    assert f"{key}={value!r} is outside the allowed range" in _problems({key: value})


def test_honest_and_byzantine_workers_together_are_capped():
    text = _problems({"num-honest": 60_000, "num-byzantine": 40_001})
    assert f"num-honest + num-byzantine = 100,001 workers; one run takes at most {MAX_WORKERS:,}" in text
    assert resolve({"num-honest": 60_000, "num-byzantine": 40_000}).num_workers == MAX_WORKERS
    assert resolve({"num-honest": 60_000, "num-byzantine": 90_000, "attack": "none"}).num_workers == 60_000


def test_multi_krum_m_beyond_the_workers_names_krum_m():
    text = _problems({"aggregator": "multi-krum", "krum-m": 1000})
    assert "krum-m=1000 exceeds the run's 70 workers" in text


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", ".hidden", "", "x" * 129, "tab\tname"])
def test_run_name_is_one_safe_folder_name(name):
    if name == "":
        assert resolve({"run-name": name})["run-name"] == ""
        return
    assert "must be one folder name inside results-dir" in _problems({"run-name": name})
    assert resolve({"run-name": "saga-gm_b10.s1=ok,+"})


def test_types_are_checked():
    assert "num-honest=50.5 must be an integer" in _problems({"num-honest": 50.5})
    assert "optimizer=3 must be a quoted string" in _problems({"optimizer": 3})
    assert "lr='fast' must be a number" in _problems({"lr": "fast"})
    assert resolve({"lr": 1})["lr"] == 1.0  # an integer is a fine number
    assert "cuda-graphs='yes' must be true or false" in _problems({"cuda-graphs": "yes"})
    assert "cuda-graphs=1 must be true or false" in _problems({"cuda-graphs": 1})
    assert resolve({"cuda-graphs": False})["cuda-graphs"] is False


def test_every_problem_is_reported_at_once():
    text = _problems({"optimizer": "adam", "lr": -1, "bogus": 1})
    assert "optimizer='adam'" in text and "lr=-1" in text and "unknown key 'bogus'" in text


def test_rules_are_built_from_their_keys():
    from byzflower.config import rule_of
    from strategies.aggregators import NNM, CenteredClipping, GeometricMedian, Median, MultiKrum

    gm = rule_of(resolve({"aggregator": "gm", "gm-tol": 1e-6, "gm-max-iter": 10, "gm-eps": 1e-9}))
    assert isinstance(gm, GeometricMedian) and (gm.tol, gm.max_iter, gm.eps) == (1e-6, 10, 1e-9)
    mk = rule_of(resolve({"aggregator": "multi-krum", "krum-m": 7, "aggregator-f": 3}))
    assert isinstance(mk, MultiKrum) and mk.m == 7 and mk.f == 3
    assert rule_of(resolve({"aggregator": "median", "median-variant": "lower"})).variant == "lower"
    cc = rule_of(resolve({"aggregator": "centered-clipping", "cc-tau": 2.5, "cc-iters": 4, "cc-init": "mean"}))
    assert isinstance(cc, CenteredClipping) and (cc.tau, cc.iterations, cc.init) == (2.5, 4, "mean")
    nnm = rule_of(resolve({"aggregator": "gm", "pre-aggregator": "nnm", "aggregator-f": 5}))
    assert isinstance(nnm, NNM) and nnm.f == 5 and isinstance(nnm.rule, GeometricMedian)
    assert isinstance(rule_of(resolve({"aggregator": "median"})), Median)


def test_aggregator_f_defaults_to_the_runs_byzantine_workers():
    assert resolve({"attack": "none", "num-byzantine": 20}).aggregator_f == 0
    assert resolve({"aggregator-f": 4}).aggregator_f == 4


def test_rules_that_cannot_run_with_the_worker_count_are_rejected_up_front():
    text = _problems({"aggregator": "krum", "num-honest": 6, "aggregator-f": 2, "attack": "none"})
    assert "aggregator='krum' needs n > 2f + 2 with f = 2" in text and "the run has 6 workers" in text
    text = _problems({"aggregator": "bulyan", "num-honest": 50, "aggregator-f": 20})
    assert "n >= 4f + 3 with f = 20" in text and "at least 83 messages" in text
    assert "aggregator-f=-2 is outside the allowed range: an integer >= -1" in _problems({"aggregator-f": -2})


def test_byzantine_ids_are_validated():
    from byzflower.factory import layout_of

    layout = layout_of(resolve({"num-honest": 5, "num-byzantine": 2, "byzantine-ids": "0, 3"}))
    assert layout.byzantine_ids == (0, 3) and layout.honest_ids == (1, 2, 4, 5, 6)
    assert "lists 1 workers but num-byzantine=2" in _problems({"num-byzantine": 2, "byzantine-ids": "4"})
    assert "[70] outside the workers 0..69" in _problems({"byzantine-ids": ",".join(map(str, range(51, 71)))})
    text = _problems({"num-byzantine": 3, "byzantine-ids": "1,1,2"})
    assert "repeats [1]" in text
    assert "must be comma-separated worker ids" in _problems({"byzantine-ids": "a,b"})


def test_attack_settings_are_checked():
    assert "needs num-byzantine >= 1" in _problems({"attack": "sign-flip", "num-byzantine": 0})
    assert "num-honest=0 must be >= 1" in _problems({"num-honest": 0, "attack": "alie"})
    assert "ipm-eps=0.0 is outside the allowed range: a finite number > 0" in _problems({"ipm-eps": 0.0})
    assert "attack='nope' is not valid" in _problems({"attack": "nope"})


def test_breakdown_settings_run_with_a_warning():
    from byzflower.config import warnings_of

    assert warnings_of(resolve({})) == []  # gm, 20 of 70
    cfg = resolve({"aggregator": "median", "num-honest": 10, "num-byzantine": 10})
    assert warnings_of(cfg) == ["median tolerates fewer than 50% Byzantine messages; 10 of 20 are Byzantine"]
    assert "mean tolerates no Byzantine message" in warnings_of(resolve({"aggregator": "mean"}))[0]
    assert "assumes f = 5" in warnings_of(resolve({"aggregator": "krum", "aggregator-f": 5}))[0]
    # bucketing dilutes the honest buckets: 20 of 70 messages can taint 20 of 35 buckets (the paper's
    # setting behind bucketing + GM, which ended at chance level with SAGA; it ran without a warning)
    assert warnings_of(resolve({"pre-aggregator": "bucketing"})) == [
        "bucketing with s = 2 can put the 20 Byzantine messages in 20 of its 35 buckets, and for the buckets: "
        "gm tolerates fewer than 50% Byzantine messages; 20 of 35 are Byzantine"
    ]
    assert warnings_of(resolve({"pre-aggregator": "bucketing", "num-byzantine": 10})) == []  # 10 of 30
    assert "20 of its 24 buckets" in warnings_of(resolve({"pre-aggregator": "bucketing", "bucket-size": 3}))[0]
    assert warnings_of(resolve({"pre-aggregator": "nnm"})) == []  # NNM keeps one row per message


def test_a_batch_larger_than_a_workers_data_is_rejected_before_the_run(mnist):
    from byzflower.factory import preflight

    cfg = resolve({"partitioner": "pathological", "num-honest": 50, "batch-size": 2000})
    with pytest.raises(ConfigError, match=r"batch-size=2000 exceeds the .* samples of honest worker"):
        preflight(cfg)
    preflight(resolve({}))  # the defaults fit


# -- the component registries ------------------------------------------------------------------


def _registries():
    from clients.attacks import ATTACKS
    from clients.estimators import ESTIMATORS
    from strategies.aggregators import RULES

    return {"aggregator": RULES, "attack": ATTACKS, "optimizer": ESTIMATORS}


def test_component_keys_come_from_the_registries_with_the_constructors_defaults():
    """Each option names a constructor argument; its key's default is that argument's default
    (written once, in the constructor) and its help names every component that reads it."""
    import inspect

    for kind, registry in _registries().items():
        for name, cls in registry.items():
            assert cls.name == name
            for key, (argument, _, _) in cls.options.items():
                parameter = inspect.signature(cls).parameters[argument]
                assert KEYS[key].default == parameter.default, (kind, name, key)
                assert name in KEYS[key].help.split(":")[0].split(", "), (key, KEYS[key].help)
            assert set(KEYS[kind].choices) - {"none"} == set(registry)


def test_every_rule_name_builds_its_own_class_with_its_keys():
    from byzflower.config import rule_of
    from strategies.aggregators import NNM, RULES

    for name, cls in RULES.items():
        rule = rule_of(resolve({"aggregator": name, "num-byzantine": 3, "num-honest": 20}))
        assert type(rule) is cls
        if hasattr(rule, "f"):
            assert rule.f == 3
    gm = rule_of(resolve({"aggregator": "gm", "gm-tol": 1e-3, "gm-max-iter": 7, "gm-eps": 1e-6}))
    assert (gm.tol, gm.max_iter, gm.eps) == (1e-3, 7, 1e-6)
    cc = rule_of(
        resolve({"aggregator": "centered-clipping", "pre-aggregator": "nnm", "cc-tau": 2.5, "cc-init": "zero"})
    )
    assert isinstance(cc, NNM) and (cc.rule.tau, cc.rule.init, cc.f) == (2.5, "zero", 20)
    assert rule_of(resolve({"aggregator": "multi-krum", "krum-m": 5})).m == 5
    assert rule_of(resolve({"aggregator": "multi-krum"})).m is None  # 0 = n - f


def test_attacks_get_their_keys_and_what_the_run_provides():
    from byzflower.config import attack_of
    from clients.attacks import alie_z

    gaussian = attack_of(resolve({"attack": "gaussian", "attack-std": 2.0, "seed": 9}))
    assert {k: v for k, v in vars(gaussian).items() if not k.startswith("_")} == {"std": 2.0, "seed": 9}
    assert attack_of(resolve({"attack": "zero-gradient", "num-byzantine": 7})).num_byzantine == 7
    assert attack_of(resolve({"attack": "alie", "num-honest": 30, "num-byzantine": 10})).z == alie_z(40, 10)
    assert attack_of(resolve({"attack": "alie", "alie-z": 1.5})).z == 1.5


def test_a_component_whose_argument_has_no_key_fails_clearly():
    from byzflower.config import build_component
    from strategies.aggregators import Rule

    class Needy(Rule):
        name = "needy"

        def __init__(self, radius: float) -> None:
            self.radius = radius

    with pytest.raises(TypeError, match="aggregator 'needy': constructor argument 'radius' has no run-config key"):
        build_component("aggregator", Needy, resolve({}), {"f": 1})


def test_the_readme_rule_and_attack_examples_run_from_run_config_alone(tmp_path):
    """The README's "Extending byzflower" rule and attack, registered before the config is read, get
    their keys, their validation and a run (in a fresh interpreter: the keys derive from the
    registries at import)."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rule = re.search(r"```python\n(class NormBall\(Rule\):.*?)```", readme, re.S).group(1)
    attack = re.search(r"```python\n(class Offset\(Attack\):.*?)```", readme, re.S).group(1)
    script = f"""
import strategies.aggregators as A
import clients.attacks as T
exec({rule!r}, vars(A))
exec({attack!r}, vars(T))
A.RULES["norm-ball"] = A.NormBall
T.ATTACKS["offset"] = T.Offset
from byzflower.config import ConfigError, KEYS, resolve
from byzflower.engine import run_local
assert KEYS["ball-radius"].default == 10.0 and "norm-ball" in KEYS["aggregator"].choices
assert KEYS["attack-offset"].default == 1.0 and "offset" in KEYS["attack"].choices
for bad, key in (({{"aggregator": "norm-ball", "ball-radius": -1}}, "ball-radius"),
                 ({{"attack": "offset", "attack-offset": float("inf")}}, "attack-offset")):
    try:
        resolve(bad)
    except ConfigError as exc:
        assert key in str(exc), exc
    else:
        raise AssertionError(f"{{bad}} was accepted")
cfg = resolve({{"aggregator": "norm-ball", "ball-radius": 3.0, "attack": "offset", "attack-offset": 100.0,
               "num-honest": 4, "num-byzantine": 1, "num-server-rounds": 3, "eval-every": 3,
               "results-dir": {str(tmp_path)!r}, "run-name": "ext"}})
print(run_local(cfg, log=lambda _: None)["status"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "finished"
    records = [json.loads(line) for line in (tmp_path / "ext" / "metrics.jsonl").read_text().splitlines()]
    # the offset message (norm ~ 100 sqrt(d) = 2e4) is outside the ball; in the mean of 5 it would put the
    # aggregate ~4e3 from the honest mean
    assert records[-1]["attack"] == "offset" and records[-1]["aggregate_distance"] < 10.0


def test_the_readme_estimator_is_the_code():
    """The README shows worker momentum's whole code: it must be the code."""
    import inspect

    from clients.estimators import Momentum

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"```python\n{inspect.getsource(Momentum)}```" in readme


def test_every_optimizer_builds_its_own_estimator_with_its_defaults_and_keys():
    import torch

    from byzflower.factory import dataset_of, gradients_of, make_estimator, worker_data
    from clients.estimators import ESTIMATORS

    extra = {"snapshot-interval": 7, "sarah-interval": 9, "sarah-restart": "fixed"}
    for name, cls in ESTIMATORS.items():
        cfg = resolve({"optimizer": name, "num-honest": 2, "attack": "none", **extra})
        assert (cfg.lr, cfg.batch_size) == (cls.default_lr, cls.default_batch_size)
        data = dataset_of(cfg)
        cpu = torch.device("cpu")
        est = make_estimator(cfg, gradients_of(cfg, data, cpu), worker_data(cfg, data, [0, 1], cpu))
        assert type(est) is cls and est.batch_size == cls.default_batch_size
    svrg = make_estimator(cfg := resolve({"optimizer": "svrg", "num-honest": 2, **extra}), *_parts(cfg))
    sarah = make_estimator(cfg := resolve({"optimizer": "sarah", "num-honest": 2, **extra}), *_parts(cfg))
    assert svrg.snapshot_interval == 7 and (sarah.restart_interval, sarah.restart) == (9, "fixed")
    assert (resolve({"optimizer": "batch-sgd"}).lr, resolve({"optimizer": "batch-sgd"}).batch_size) == (0.5, 50)
    assert "sgd/momentum 5, batch-sgd 50, saga/svrg/sarah 1" in KEYS["batch-size"].help


def _parts(cfg):
    import torch

    from byzflower.factory import dataset_of, gradients_of, worker_data

    data, cpu = dataset_of(cfg), torch.device("cpu")
    return gradients_of(cfg, data, cpu), worker_data(cfg, data, [0, 1], cpu)
