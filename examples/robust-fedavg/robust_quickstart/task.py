"""The model, the data of one client, local training and evaluation (as in Flower's quickstarts)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from byzflower.data import load_dataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def load_partition(partition_id: int, num_partitions: int, batch_size: int = 32):
    """Client ``partition_id``'s IID share of MNIST's training set (offline: byzflower's copy)."""
    data = load_dataset("mnist")
    order = np.random.default_rng(0).permutation(len(data.train_labels))
    idx = np.array_split(order, num_partitions)[partition_id]
    x = data.inputs(data.train_images[idx])
    y = torch.from_numpy(data.train_labels[idx])
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(partition_id),
    )


def test_set():
    data = load_dataset("mnist")
    return data.inputs(data.test_images), torch.from_numpy(data.test_labels)


def train(net: Net, loader, epochs: int, lr: float) -> float:
    optimiser = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimiser.step()
            total, count = total + float(loss) * len(y), count + len(y)
    return total / max(count, 1)


def accuracy(net: Net, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())
