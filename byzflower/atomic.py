"""Write-then-rename for cache files that several writers may build at once, and what reading a saved
file back raises when it is damaged (or, for a checkpoint, another version's)."""

from __future__ import annotations

import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What ``np.load`` of a damaged .npz cache raises (a copy cut short, a disk fault): a cut zip is
# BadZipFile, which is neither OSError nor ValueError; a missing member KeyError; a cut member EOFError.
DAMAGED_NPZ = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile)
# What ``torch.load`` of a damaged file raises: torch's zip reader RuntimeError, a cut pickle EOFError or
# UnpicklingError.
DAMAGED_TORCH = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError)
# What putting a checkpoint's state back (``load_state_dict``) raises when another version of byzflower
# wrote it: a key missing or unknown, a shape or type changed.
FOREIGN_STATE = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)


def tmp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary file name in ``path``'s folder that no other writer uses (process and thread in the
    name), to be renamed onto ``path`` once written. With one shared name, two runs building the same
    cache at once (a sweep's first runs) had the second rename fail: the first had moved the file."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{suffix}")


def cache_file(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> bool:
    """Write a cache file through a temporary file beside it (``write(tmp)``), renamed when whole.
    A cache is an economy: when it cannot be written (a full disk, a file-size limit) the temporary
    file is removed, a warning says so and the caller goes on with what it computed (False)."""
    tmp = tmp_beside(path, suffix)
    try:
        write(tmp)
        tmp.replace(path)
        return True
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"{path} could not be written ({exc.strerror or exc}); it is computed again next time", stacklevel=3
        )
        return False


def cache_npz(path: Path, **arrays: Any) -> bool:
    """``cache_file`` of ``np.savez(arrays)`` (whose name must end in .npz, or np.savez adds it)."""
    import numpy as np

    return cache_file(path, lambda tmp: np.savez(tmp, **arrays), ".tmp.npz")
