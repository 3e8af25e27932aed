"""The models byzflower trains: the paper's MLP, the authors' notebook network, and a small CNN.

``mlp`` and ``cnn`` output logits; ``mlp-notebook`` outputs probabilities, on purpose (see its doc).
"""

from __future__ import annotations

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


MODELS = {"mlp": MLP, "mlp-notebook": NotebookMLP, "cnn": CNN}


def build_model(name: str, seed: int, input_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10) -> nn.Module:
    """The model ``name`` with weights initialised from ``seed`` alone."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not available; choose one of: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "model-init"))
        if name in ("mlp", "mlp-notebook"):
            in_features = 1
            for s in input_shape:
                in_features *= s
            return MODELS[name](in_features, 50, classes)
        return CNN(input_shape[0], classes)
