"""The LIBSVM binary classification sets of the paper's convex experiments: IJCNN1 and COVTYPE.

No package registry ships them, so they come from the LIBSVM site on a machine with internet (or are
put by hand into ``<data-dir>/<name>/`` under the site's file names, compressed or not). The site
publishes no checksums: the SHA-256 of each file is recorded at its first use (trust on first use)
in ``<data-dir>/<name>/sha256.json`` and checked on every later use, and the parsed set must have the
known number of samples and features. The parsed arrays are cached beside (``features.npz``), keyed by
those SHA-256s.

Labels (+1/-1 for IJCNN1, 1/2 for COVTYPE) become classes 0 and 1 in their sorted order; features are
the files' own (COVTYPE's scaled release, in [0, 1]), dense float32, missing entries 0. COVTYPE has
no test file: a seeded 10% of its rows is held out as the test set, the rest is the training set.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from byzflower.atomic import DAMAGED_NPZ, cache_npz

_F32_MAX = float(np.finfo(np.float32).max)
BASE_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"

Log = Callable[[str], None]


@dataclass(frozen=True)
class LibsvmSpec:
    """A LIBSVM set: its files on the site, and the samples and features its training file must hold."""

    name: str
    train_file: str
    rows: int
    features: int
    test_file: str | None = None
    test_rows: int | None = None
    holdout: float = 0.0  # without a test file: the fraction of rows held out (seeded) as the test set

    @property
    def files(self) -> tuple[str, ...]:
        return (self.train_file,) if self.test_file is None else (self.train_file, self.test_file)


LIBSVM_SETS = {
    "ijcnn1": LibsvmSpec("ijcnn1", "ijcnn1.bz2", 49_990, 22, "ijcnn1.t.bz2", 91_701),
    "covtype": LibsvmSpec("covtype", "covtype.libsvm.binary.scale.bz2", 581_012, 54, holdout=0.1),
}


class LibsvmError(RuntimeError):
    """A LIBSVM file is missing, malformed, of the wrong size, or not the file first used."""


def parse_libsvm(text: str, features: int, source: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """(X (n, features) float32, raw labels (n,) float64) from LIBSVM text: ``label i:v i:v ...``
    with 1-based feature indices; absent features are 0. Names the line of any malformed entry, and
    of any label or value that is not finite in float32 (nan, inf, 1e39)."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    labels: list[float] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            label = float(parts[0])
            if not math.isfinite(label):
                raise ValueError(f"label {parts[0]} is not finite")
            labels.append(label)
            for token in parts[1:]:
                index, value = token.split(":")
                col = int(index)
                if not 1 <= col <= features:
                    raise ValueError(f"feature index {col} outside 1..{features}")
                v = float(value)
                if not abs(v) <= _F32_MAX:  # NaN fails this too
                    raise ValueError(f"feature value {value} is not a finite float32")
                rows.append(len(labels) - 1)
                cols.append(col - 1)
                vals.append(v)
        except ValueError as exc:
            raise LibsvmError(f"{source}, line {number}: {exc} in {line[:80]!r}") from None
    x = np.zeros((len(labels), features), dtype=np.float32)
    x[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = np.asarray(vals, dtype=np.float32)
    return x, np.asarray(labels, dtype=np.float64)


def _classes(raw: np.ndarray, source: str) -> np.ndarray:
    values = np.unique(raw)
    if len(values) != 2:
        raise LibsvmError(f"{source}: a binary set needs exactly 2 label values, found {values[:5].tolist()}")
    return (raw == values[1]).astype(np.int64)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local(folder: Path, name: str) -> Path | None:
    """The file as the site names it, or decompressed (without .bz2)."""
    for candidate in (folder / name, folder / name.removesuffix(".bz2")):
        if candidate.is_file():
            return candidate
    return None


def _download(name: str, folder: Path, log: Log) -> Path:
    url = BASE_URL + name
    target = folder / name
    tmp = target.with_suffix(target.suffix + ".part")
    log(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LibsvmError(
            f"cannot download {url} ({exc}); on a machine without internet put {name} (from the LIBSVM site) "
            f"into {folder}"
        ) from None
    tmp.replace(target)
    return target


def ensure_libsvm(spec: LibsvmSpec, folder: Path, log: Log = lambda _: None) -> dict[str, str]:
    """Make sure ``folder`` holds the set's files (downloading what is missing) and that each is the
    file first used there; returns {file: SHA-256}."""
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "sha256.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    shas = {}
    for name in spec.files:
        path = _local(folder, name) or _download(name, folder, log)
        sha = _sha256(path)
        known = record.get(path.name)
        if known is None:
            record[path.name] = sha
            log(f"{spec.name}: recorded SHA-256 {sha} of {path.name} (first use); later uses must match it")
        elif known != sha:
            raise LibsvmError(
                f"{path} has SHA-256 {sha}, but {known} was recorded at its first use ({record_path}); "
                "remove the file to fetch it again, or the record to trust this one"
            )
        shas[name] = sha
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
    return shas


def _read(path: Path) -> str:
    data = path.read_bytes()
    return (bz2.decompress(data) if path.suffix == ".bz2" else data).decode("ascii", errors="strict")


def load_libsvm(spec: LibsvmSpec, folder: Path, log: Log = lambda _: None) -> dict[str, np.ndarray]:
    """{'train_x', 'train_y', 'test_x', 'test_y'}: the verified, parsed set (cached as features.npz)."""
    shas = ensure_libsvm(spec, folder, log)
    key = hashlib.sha256(json.dumps([spec.name, sorted(shas.items()), spec.holdout]).encode()).hexdigest()[:16]
    cache = folder / "features.npz"
    try:
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except DAMAGED_NPZ:  # none yet, or damaged: parsed again
        pass
    parsed = {}
    for name, rows in ((spec.train_file, spec.rows), (spec.test_file, spec.test_rows)):
        if name is None:
            continue
        path = _local(folder, name)
        x, raw = parse_libsvm(_read(path), spec.features, str(path))
        if x.shape != (rows, spec.features):
            raise LibsvmError(
                f"{path} holds {x.shape[0]} samples x {spec.features} features, but {spec.name}'s "
                f"{'training' if name == spec.train_file else 'test'} file has {rows} x {spec.features}"
            )
        parsed[name] = (x, _classes(raw, str(path)))
    train_x, train_y = parsed[spec.train_file]
    if spec.test_file is not None:
        test_x, test_y = parsed[spec.test_file]
    else:  # a seeded hold-out, the same on every machine
        order = np.random.default_rng(0).permutation(len(train_y))
        cut = round(spec.holdout * len(train_y))
        test, train = np.sort(order[:cut]), np.sort(order[cut:])
        train_x, train_y, test_x, test_y = train_x[train], train_y[train], train_x[test], train_y[test]
    out = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    cache_npz(cache, key=np.array(key), **out)
    return out
