"""Shared fixtures: real MNIST (fetched by the project's own data code), seeded torch."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist():
    from byzflower.data import load_dataset

    return load_dataset("mnist", os.environ.get("BYZFLOWER_DATA_DIR", ""))


@pytest.fixture
def task_identity():
    """Outside a running app Flower needs a task identity to build instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
