"""Shared fixtures: real MNIST (fetched by the project's own data code), seeded torch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Two threads, or one per lane under pytest-xdist (``make test``), where two lanes of two threads on two
# cores wait on each other's threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The longest files first: ``make test``'s lanes (``--dist loadfile``) hand out whole files in collection
# order, so a long file collected late sets the lane's end alone (the Flower file, ~10 of the ~24
# minutes of test time, began after ~9 others); started first, the short files fill in beside it.
_LONGEST_FIRST = ("test_flower_app.py", "test_local_engine.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept


@pytest.fixture(scope="session", autouse=True)
def ray_session_files():
    """A Ray writes its session files (logs, sockets) under ``$RAY_TMPDIR/ray``, by default the
    machine's ``/tmp/ray``, and leaves them there. byzflower's own Ray starts put them in the run's
    folder where RAY_TMPDIR is unset (the tests of that unset it); every other Ray of the suite's
    writes to a short folder of its own, deleted at the end (Unix socket paths must stay under
    108 characters, so not under pytest's deeper ``tmp_path``)."""
    folder = tempfile.TemporaryDirectory(prefix="bzf-ray-", ignore_cleanup_errors=True)
    with folder, pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", folder.name)
        yield folder.name


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
