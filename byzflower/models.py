"""The models byzflower trains: the paper's MLP, the authors' notebook network, a small CNN,
multinomial logistic regression (the paper's convex experiments) and ResNets.

``mlp`` and ``cnn`` output logits; ``mlp-notebook`` outputs probabilities, on purpose (see its doc).
Any other torch model plugs in as 'package.module:factory' (see ``build_model``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from clients.rng import derive_seed


class MLP(nn.Module):
    """The paper's network: 784 -> 50 tanh units -> 10 logits (39,760 parameters).

    The seed notebook also applies tanh to the input and softmax before CrossEntropyLoss (a
    double softmax); neither is in the paper, so neither is here.
    """

    def __init__(self, in_features: int = 784, hidden: int = 50, classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.output = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(x.flatten(1))))


class NotebookMLP(nn.Module):
    """The network behind the paper's published MNIST numbers, kept as the authors ran it.

    tanh on the (normalised) input, Linear(784, 50), tanh, Linear(50, 10), **softmax**; the loss
    (cross-entropy) is then applied to these probabilities as if they were logits: a double
    softmax. Its loss can never go below ln(e + 9) - 1 = 1.46 (the authors' recorded test losses
    end at 1.48-1.6), and its gradients vanish once the softmax saturates. Use it to compare with
    the paper's Table I, ``mlp`` for everything else. Same parameters as ``mlp`` (39,760).
    """

    def __init__(self, in_features: int = 784, hidden: int = 50, classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.output = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.output(torch.tanh(self.hidden(torch.tanh(x.flatten(1))))), dim=1)


class CNN(nn.Module):
    """A small conv net for 1x28x28 images: two 5x5 conv + max-pool stages, then 64 -> 10."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class LogReg(nn.Module):
    """Multinomial logistic regression: one Linear layer from the flattened input to the logits.
    With cross-entropy and ``weight-decay`` > 0 the honest objective is strongly convex (the
    paper's Figs. 3-6 use l2-regularised logistic regression with weight 0.01)."""

    def __init__(self, in_features: int = 784, classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def resnet(depth: int, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """torchvision's ResNet-18 or -50 with GroupNorm (32 groups) in place of BatchNorm, so that
    every sample's gradient is its own (per-sample gradients, SAGA's table). Pictures up to 64
    pixels (CIFAR-10's 32 x 32) get the usual small-image stem: a 3 x 3 stride-1 first convolution
    and no max-pooling; the first convolution takes the data set's channels."""
    from torchvision.models import resnet18, resnet50

    model = (resnet18 if depth == 18 else resnet50)(num_classes=classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    small = max(input_shape[1:]) <= 64
    if small or input_shape[0] != 3:
        kernel, stride, pad = (3, 1, 1) if small else (7, 2, 3)
        model.conv1 = nn.Conv2d(input_shape[0], 64, kernel, stride, pad, bias=False)
    if small:
        model.maxpool = nn.Identity()
    return model


def _features(input_shape: tuple[int, ...]) -> int:
    n = 1
    for size in input_shape:
        n *= size
    return n


# The built-in models, by run-config name. Each is a factory of the same form as a user's
# 'package.module:factory': factory(input_shape=(C, H, W), num_classes=K) -> nn.Module.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda input_shape, num_classes: MLP(_features(input_shape), 50, num_classes),
    "mlp-notebook": lambda input_shape, num_classes: NotebookMLP(_features(input_shape), 50, num_classes),
    "cnn": lambda input_shape, num_classes: CNN(input_shape[0], num_classes),
    "logreg": lambda input_shape, num_classes: LogReg(_features(input_shape), num_classes),
    "resnet18": lambda input_shape, num_classes: resnet(18, input_shape, num_classes),
    "resnet50": lambda input_shape, num_classes: resnet(50, input_shape, num_classes),
}


#: built-in models for (channels, height, width) images only
IMAGE_MODELS = ("cnn", "resnet18", "resnet50")


class ModelError(ValueError):
    """A model cannot be used (unknown, not importable, not a module, or its samples not independent)."""


def build_model(name: str, seed: int, input_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10) -> nn.Module:
    """The model ``name`` (a key of MODELS, or 'package.module:factory') for (C, H, W) inputs and
    ``classes`` outputs, its weights initialised from ``seed`` alone, checked as usable."""
    factory = MODELS.get(name) or _import_factory(name)
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise ModelError(
            f"model={name!r} takes images (channels, height, width), not samples of shape {tuple(input_shape)}; "
            f"choose one of: {', '.join(m for m in MODELS if m not in IMAGE_MODELS)}, or package.module:factory"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model-init"))
            model = factory(input_shape=tuple(input_shape), num_classes=classes)
    except Exception as exc:  # a factory that cannot make a model for these samples
        raise ModelError(
            f"model={name!r} cannot be built for samples of shape {tuple(input_shape)}: {_said(exc)}"
        ) from None
    return _checked(name, model, tuple(input_shape), classes)


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _import_factory(name: str) -> Callable[..., nn.Module]:
    if ":" not in name:
        raise ModelError(
            f"model={name!r} is not available; choose one of: {', '.join(MODELS)}, or package.module:factory"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing while it loads
        raise ModelError(f"model={name!r}: cannot import {module_name!r} ({_said(exc)})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelError(f"model={name!r}: {module_name!r} has no callable {attribute!r}")
    return factory


def _checked(name: str, model: object, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """``model`` if usable: an nn.Module, no batch statistics (per-sample gradients need samples
    that do not see each other), and (n, classes) outputs for n samples."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model={name!r}: the factory returned {type(model).__name__}, not a torch nn.Module")
    norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if norms:
        raise ModelError(
            f"model={name!r} has {', '.join(norms)} layers: batch statistics mix the samples of a batch, so "
            "per-sample gradients are not defined; use GroupNorm or LayerNorm"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model={name!r} has no trainable parameters")
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape, dtype=dtype))
    except Exception as exc:  # e.g. a conv net whose layers fit other image sizes
        raise ModelError(f"model={name!r} cannot take samples of shape {input_shape}: {_said(exc)}") from None
    model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model={name!r} maps 2 samples of shape {input_shape} to {shape}; it must output (n, {classes}) logits"
        )
    return model
