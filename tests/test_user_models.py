"""A user's own torch model from run-config alone: model='package.module:factory'."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from byzflower.config import ConfigError, resolve
from byzflower.engine import run_local

MODULE = textwrap.dedent(
    """
    import math

    from torch import nn

    from byzflower.models import MLP


    def paper_mlp(input_shape, num_classes):
        # the built-in 'mlp', written as a user would: must give the very same run
        return MLP(math.prod(input_shape), 50, num_classes)


    def conv_groupnorm(input_shape, num_classes):
        return nn.Sequential(
            nn.Conv2d(input_shape[0], 4, 5, stride=2), nn.GroupNorm(2, 4), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 12 * 12, num_classes),
        )


    def batchnorm(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.BatchNorm1d(20), nn.Linear(20, num_classes))


    def wrong_width(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes + 1))


    def not_a_module(input_shape, num_classes):
        return "a string"


    def refuses(input_shape, num_classes):
        raise ValueError("this net needs RGB pictures")


    def wrong_input(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))


    NOT_CALLABLE = 3
    """
)
RUN = {"num-honest": 6, "num-byzantine": 2, "seed": 2, "num-server-rounds": 6, "eval-every": 3}


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _records(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in ("elapsed_s", "iters_per_s")} for x in lines]


def test_a_user_model_is_the_built_in_when_it_is_the_same_network(user_models, mnist):
    runs = {}
    for name, model in (("builtin", "mlp"), ("user", "my_models:paper_mlp")):
        cfg = resolve({**RUN, "model": model, "results-dir": str(user_models / "runs"), "run-name": name})
        assert run_local(cfg, log=lambda _: None)["status"] == "finished"
        runs[name] = _records(user_models / "runs" / name)
    assert runs["user"] == runs["builtin"]


def test_a_user_conv_net_with_groupnorm_trains(user_models, mnist):
    cfg = resolve(
        {**RUN, "model": "my_models:conv_groupnorm", "optimizer": "saga", "results-dir": str(user_models / "runs")}
    )
    summary = run_local(cfg, log=lambda _: None)
    assert summary["status"] == "finished" and summary["iterations"] == 6
    assert summary["final"]["honest_variance"] > 0 and summary["final"]["train_loss"] < 2.31


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("my_models:batchnorm", "BatchNorm1d layers: batch statistics mix the samples.*use GroupNorm"),
        ("my_models:wrong_width", r"maps 2 samples of shape \(1, 28, 28\) to \(2, 11\); it must output \(n, 10\)"),
        ("my_models:not_a_module", "returned str, not a torch nn.Module"),
        ("my_models:refuses", r"cannot be built for samples of shape \(1, 28, 28\): ValueError: this net needs RGB"),
        ("my_models:wrong_input", r"cannot take samples of shape \(1, 28, 28\): RuntimeError: .* \(dataset='mnist'\)"),
        ("my_models:NOT_CALLABLE", "'my_models' has no callable 'NOT_CALLABLE'"),
        ("my_models:missing", "'my_models' has no callable 'missing'"),
        ("no_such_package.models:net", "cannot import 'no_such_package.models' .ModuleNotFoundError"),
    ],
)
def test_an_unusable_user_model_is_refused_before_any_folder_exists(user_models, mnist, model, message):
    results = user_models / "runs"
    with pytest.raises(ConfigError, match=message):
        run_local(resolve({**RUN, "model": model, "results-dir": str(results)}), log=lambda _: None)
    assert not list(results.glob("*")) if results.exists() else True


def test_a_model_name_of_neither_form_names_both():
    with pytest.raises(ConfigError, match=r"choose one of: mlp, .*, resnet50, or package\.module:factory"):
        resolve({"model": "resnet"})


def test_a_built_in_model_that_cannot_take_the_data_is_one_line_naming_the_others():
    """model='cnn' or a ResNet on a LIBSVM set's feature vectors (or the small CNN on 32 x 32 pictures)
    ended in a traceback from inside torch (conv2d's input check, or max() of an empty shape)."""
    from byzflower.models import ModelError, build_model

    for name in ("cnn", "resnet18", "resnet50"):
        with pytest.raises(
            ModelError,
            match=rf"model='{name}' takes images .* not samples of shape \(22,\); "
            r"choose one of: mlp, mlp-notebook, logreg, or package\.module:factory",
        ):
            build_model(name, 1, (22,), 2)
    with pytest.raises(ModelError, match=r"model='cnn' cannot take samples of shape \(3, 32, 32\): RuntimeError"):
        build_model("cnn", 1, (3, 32, 32), 10)
    assert build_model("logreg", 1, (22,), 2)(torch.zeros(4, 22)).shape == (4, 2)
