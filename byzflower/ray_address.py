"""Check a Ray cluster address before anything starts (no Ray or Flower import)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from byzflower.config import ConfigError


def recorded_cluster_file() -> Path:
    """Where ``ray start`` records the address that ``ray.init('auto')`` joins (Ray's rule on Linux)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"


# Ray's longest Unix socket path below its temporary folder T (RAY_TMPDIR), with a 7-digit PID
_RAY_SOCKET_TAIL = len("/ray/session_2026-11-28_00-33-14_761891_4194304/sockets/plasma_store")
_SOCKET_PATH_MAX = (104 if sys.platform == "darwin" else 108) - 1  # AF_UNIX paths, less the terminating NUL


def private_ray_tmpdir(folder: str | Path, env: Mapping[str, str] = os.environ) -> str | None:
    """``folder`` as the RAY_TMPDIR of a Ray that we start, so that its session files (logs,
    sockets) go with ``folder`` instead of staying in the machine's /tmp/ray after the run; None
    where Ray should keep its own place: ``env`` sets RAY_TMPDIR (the user's choice), or Ray's socket paths below
    ``folder`` would be too long for a Unix socket (a deep $TMPDIR)."""
    if env.get("RAY_TMPDIR"):
        return None
    text = str(folder)
    return text if len(text.encode()) + _RAY_SOCKET_TAIL <= _SOCKET_PATH_MAX else None


def check_ray_address(address: str) -> None:
    """Raise ValueError, naming the address and what to do, unless a Ray cluster can answer there:
    HOST:PORT must accept a connection (Ray's GCS port); 'auto' means $RAY_ADDRESS or the cluster
    that ``ray start`` recorded on this machine, which must answer too (Ray would wait on a dead one
    for minutes)."""
    shown = repr(address)
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "")
        record = recorded_cluster_file()
        if env not in ("", "auto", "local"):
            address, shown = env, f"'auto' ($RAY_ADDRESS={env!r})"
        elif record.is_file() and record.read_text().strip():
            address = record.read_text().strip()
            shown = f"'auto' (the cluster recorded in {record}, {address})"
        else:
            raise ValueError(
                f"ray address 'auto': no cluster is recorded on this machine ({record} is missing; `ray start "
                "--head` writes it); give HOST:PORT, or leave the option out"
            )
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address, as Ray writes it: [::1]:6379
        host = host[1:-1]
    elif ":" in host:  # unbracketed IPv6: where the port begins is ambiguous
        host = ""
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"ray address {shown} is not 'auto' or HOST:PORT with a port 1-65535 (e.g. 127.0.0.1:6379, [::1]:6379)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ValueError(
            f"ray address {shown}: nothing answers there ({exc.strerror or exc}); start a cluster with "
            "`ray start --head` and give the address it prints, or leave the option out"
        ) from None


def check_ray_option(address: str) -> None:
    """``check_ray_address`` for the command line (``run``, ``sweep``): a ConfigError naming the option."""
    try:
        check_ray_address(address)
    except ValueError as exc:
        raise ConfigError(f"--ray-address: {exc}") from None
