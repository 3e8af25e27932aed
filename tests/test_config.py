import tomllib
from pathlib import Path

import pytest

from byzflower.config import DEFAULTS, KEYS, ConfigError, resolve

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
    assert cfg["num-honest"] == 50 and cfg["num-byzantine"] == 20
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
    assert "model='vgg'" in _problems({"model": "vgg"}) and "mlp, cnn" in _problems({"model": "vgg"})
    assert "iid, dirichlet, pathological" in _problems({"partitioner": "shards"})
    assert "mnist, fashion-mnist" in _problems({"dataset": "cifar10"})


def test_planned_choices_say_not_available_yet():
    for key in KEYS.values():
        for name in key.planned:
            if name not in key.choices:
                assert "not available yet" in _problems({key.name: name})


def test_bad_numbers_name_key_and_value():
    assert "num-server-rounds=0 must be > 0" in _problems({"num-server-rounds": 0})
    assert "eval-every=-5 must be > 0" in _problems({"eval-every": -5})
    assert "lr=-0.1 must be >= 0" in _problems({"lr": -0.1})
    assert "batch-size=-1 must be >= 0" in _problems({"batch-size": -1})
    assert "num-honest=0 must be >= 1" in _problems({"num-honest": 0})
    assert "dirichlet-alpha=0.0 must be > 0" in _problems({"dirichlet-alpha": 0.0})


def test_types_are_checked():
    assert "num-honest=50.5 must be an integer" in _problems({"num-honest": 50.5})
    assert "optimizer=3 must be a quoted string" in _problems({"optimizer": 3})
    assert "lr='fast' must be a number" in _problems({"lr": "fast"})
    assert resolve({"lr": 1})["lr"] == 1.0  # an integer is a fine number


def test_every_problem_is_reported_at_once():
    text = _problems({"optimizer": "adam", "lr": -1, "bogus": 1})
    assert "optimizer='adam'" in text and "lr=-1" in text and "unknown key 'bogus'" in text
