"""Fast conversion between numpy arrays and Flower ``Array``s (no Flower import).

Flower serialises every ``Array`` as a ``.npy`` file; ``np.load`` parses each header with
``ast.literal_eval``, which dominates the server's time when 70 gradients of a few arrays arrive
every iteration. The header of a given (dtype, shape) is always the same bytes, so it is built
once and matched byte for byte; anything else takes numpy's own (slow, safe) path.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


@functools.lru_cache(maxsize=256)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The bytes np.save writes before the data of a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """What ``np.save`` would write for ``array`` (version 1.0 headers, C order)."""
    a = np.asarray(array, order="C")
    return npy_header(a.dtype.str, tuple(a.shape)) + a.tobytes()


def decode(array: Any) -> np.ndarray:
    """A Flower ``Array`` as numpy: fast when its header is the canonical one, np.load otherwise."""
    data = array.data
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(s) for s in array.shape)
        header = npy_header(dtype.str, shape)
    except (TypeError, ValueError):
        return array.numpy()
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if array.stype == NUMPY_STYPE and len(data) == len(header) + nbytes and data.startswith(header):
        return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    return array.numpy()
