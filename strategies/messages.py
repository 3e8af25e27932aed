"""The message format shared by byzflower's ServerApp (its harness), its ClientApp and ``RobustSGD``.

Records (Flower Message API), by direction:

- server -> node, ``train``: ``content[ARRAYS]`` the model (an ArrayRecord), ``content[CONFIG]`` a
  ConfigRecord with ``SERVER_ROUND`` and ``PHASE`` (``HONEST``: compute the workers' messages;
  ``BYZANTINE``: the omniscient attack, with the honest messages' statistics in ``content[STATS]``,
  arrays "mean" and "std", and ``HONEST_COUNT``);
- node -> server: ``content[ROWS][ROWS]`` one (k, d) float32 array and ``content[WORKERS][IDS]`` the k
  worker ids of its rows (``rows_content``); in the first round of a resumed run, ``content[STATE][REBUILT]``
  True when the node kept no readable state of the checkpoint and rebuilt its workers' state instead;
- harness -> strategy: one reply per worker, ``content[GRADIENT]`` an ArrayRecord shaped like the
  model (``flat_to_arrays``).

Arrays travel as ``.npy`` bytes (``strategies.npy``); no other encoding is used.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from strategies.npy import NUMPY_STYPE, decode, npy_bytes

ARRAYS, CONFIG, GRADIENT, STATS = "arrays", "config", "gradient", "stats"
ROWS, WORKERS, IDS = "rows", "workers", "ids"
PHASE, HONEST, BYZANTINE = "phase", "honest", "byzantine"
SERVER_ROUND, HONEST_COUNT = "server-round", "honest-count"
REBUILD = "rebuild"  # the node (re)joined mid-run: rebuild its workers' state at the model
RESUME_FROM = "resume-from"  # a resumed run: put back the workers' state of this iteration
STATE, REBUILT = "state", "rebuilt"  # a node's reply to RESUME_FROM: it had to rebuild that state


def array(a: np.ndarray) -> Array:
    """A Flower Array of ``a`` (what ``Array(a)`` builds, without np.save's overhead)."""
    return Array(dtype=str(a.dtype), shape=tuple(int(s) for s in a.shape), stype=NUMPY_STYPE, data=npy_bytes(a))


def flat_to_arrays(flat: np.ndarray, keys: list[str], shapes: list[tuple[int, ...]]) -> ArrayRecord:
    """A flat (d,) vector as an ArrayRecord with the model's keys and shapes."""
    record, offset = ArrayRecord(), 0
    for key, shape in zip(keys, shapes, strict=True):
        n = int(np.prod(shape, dtype=np.int64))
        record[key] = array(flat[offset : offset + n].reshape(shape))
        offset += n
    return record


def arrays_to_flat(arrays: ArrayRecord) -> tuple[np.ndarray, list[str], list[tuple[int, ...]]]:
    """An ArrayRecord as one flat (d,) vector in its key order, with its keys and shapes (the
    inverse of ``flat_to_arrays``)."""
    parts = [decode(a) for a in arrays.values()]
    flat = np.concatenate([a.reshape(-1) for a in parts]) if parts else np.zeros(0, np.float32)
    return flat, list(arrays.keys()), [tuple(a.shape) for a in parts]


def read_flat(
    record: ArrayRecord | None, keys: list[str], shapes: list[tuple[int, ...]], out: np.ndarray | None = None
) -> tuple[np.ndarray | None, str]:
    """A reply's arrays as one flat float32 vector (written into ``out`` if given) when they mirror
    the model (same keys in order, same shapes, a floating dtype) and are finite; else (None,
    reason) with reason 'malformed' or 'nonfinite'. Checked from the headers before any copy."""
    try:
        if record is None or list(record.keys()) != keys:
            return None, "malformed"
        if [tuple(record[k].shape) for k in keys] != shapes or not all(
            np.issubdtype(np.dtype(record[k].dtype), np.floating) for k in keys
        ):
            return None, "malformed"
        dim = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
        flat = np.empty(dim, dtype=np.float32) if out is None else out
        offset = 0
        for k in keys:
            part = decode(record[k])
            if part.shape != record[k].shape:
                return None, "malformed"
            flat[offset : offset + part.size] = part.reshape(-1)
            offset += part.size
    except Exception:  # undecodable bytes and the like: a bad message, not a server failure
        return None, "malformed"
    if not np.isfinite(flat).all():
        return None, "nonfinite"
    return flat, "ok"


def rows_content(workers: list[int], rows: np.ndarray, rebuilt: bool = False) -> RecordDict:
    """A node's reply: its workers' ids and their (k, d) messages, as float32 (and, ``rebuilt``, that
    it could not put back the checkpoint's state the server asked for)."""
    content = RecordDict(
        {
            ROWS: ArrayRecord({ROWS: array(rows.astype(np.float32, copy=False))}),
            WORKERS: ConfigRecord({IDS: [int(w) for w in workers]}),
        }
    )
    if rebuilt:
        content[STATE] = ConfigRecord({REBUILT: True})
    return content
