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


_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def decode(array: Any) -> np.ndarray:
    """A Flower ``Array`` as numpy, viewed in place: fast when its header is the canonical one.

    Any other header (another writer's padding, a version 2.0 header, Fortran order) is read
    alone and must describe the Array's declared dtype and shape with exactly the bytes that
    follow; else ValueError. Nothing is allocated from what a header claims (``np.load``, which
    Flower's ``Array.numpy`` calls, allocates the claimed size before it finds the data short:
    800 MB for a 48-byte reply claiming 2e8 floats)."""
    if array.stype != NUMPY_STYPE:
        raise ValueError(f"an Array serialised as {array.stype!r}, not {NUMPY_STYPE!r}")
    data = array.data
    dtype = np.dtype(array.dtype)
    shape = tuple(int(s) for s in array.shape)
    if dtype.hasobject or any(s < 0 for s in shape):
        raise ValueError(f"an Array of dtype {dtype} and shape {shape} cannot be read from bytes")
    header = npy_header(dtype.str, shape)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) == len(header) + nbytes and data.startswith(header):
        return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in _READERS:
        raise ValueError(f"an .npy header of version {version} (1.0 and 2.0 are read)")
    claimed, fortran, claimed_dtype = _READERS[version](stream)
    if claimed != shape or claimed_dtype != dtype or len(data) - stream.tell() != nbytes:
        raise ValueError(
            f"the data's header says {claimed_dtype} {claimed} in {len(data) - stream.tell()} bytes, "
            f"the Array {dtype} {shape} in {nbytes}"
        )
    flat = np.frombuffer(data, dtype=dtype, offset=stream.tell())
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
