"""Write-then-rename for cache files that several writers may build at once."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def tmp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary file name in ``path``'s folder that no other writer uses (process and thread in the
    name), to be renamed onto ``path`` once written. With one shared name, two runs building the same
    cache at once (a sweep's first runs) had the second rename fail: the first had moved the file."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{suffix}")
