"""Worker state that stays on the node's disk: memory-mapped tensors keyed by run and workers.

A node's ClientApp may run in any Ray actor (simulation) or in a fresh process per message
(deployment); state in shared memory-mapped files is seen by all of them, never travels in
messages, and never bloats ``context.state``.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clients.estimators import Allocator


def state_root() -> Path:
    """$BYZFLOWER_STATE_DIR, else <tmp>/byzflower-state-<user>."""
    if os.environ.get("BYZFLOWER_STATE_DIR"):
        return Path(os.environ["BYZFLOWER_STATE_DIR"]).expanduser()
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"byzflower-state-{user}"


def state_key(run_config: Mapping[str, Any], run_id: int) -> str:
    """The name of a run's state folder on a node: per Flower run, except for a named run
    (``run-name``), whose state outlives its Flower run so that the run can resume on it."""
    name = str(run_config.get("run-name", "") or "")
    if not name:
        return f"run-{run_id}"
    digest = hashlib.sha256(f"{run_config.get('results-dir', '')}|{name}".encode()).hexdigest()[:16]
    return f"named-{digest}"


def run_state_dir(key: str | int) -> Path:
    return state_root() / (key if isinstance(key, str) else f"run-{key}")


def mapped_allocator(folder: Path) -> Allocator:
    """Allocate state as shared memory-mapped files in ``folder`` (zero-filled when new)."""
    folder.mkdir(parents=True, exist_ok=True)

    def allocate(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        path = folder / f"{name}.bin"
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if path.exists() and path.stat().st_size != nbytes:
            path.unlink()  # left over from another layout: start afresh
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(nbytes)  # sparse, reads as zeros
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    return allocate


def remove_run_state(key: str | int) -> bool:
    """Delete a run's state folder; True if there was one."""
    folder = run_state_dir(key)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        return True
    return False
