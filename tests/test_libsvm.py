"""The LIBSVM sets (IJCNN1, COVTYPE) offline: generated files in the LIBSVM format at IJCNN1's real
sizes, placed by hand or served over HTTP by a local server, parsed, counted, trusted on first use,
and run through the engine with logistic regression and the optimality gap."""

from __future__ import annotations

import bz2
import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from byzflower import data as D
from byzflower.config import resolve
from byzflower.data import libsvm
from byzflower.engine import run_local


def libsvm_text(x: np.ndarray, labels: np.ndarray) -> str:
    """LIBSVM lines for dense x, zeros left out, 1-based indices."""
    lines = []
    for row, label in zip(x, labels, strict=True):
        cols = np.flatnonzero(row)
        lines.append(" ".join([f"{label:+d}", *(f"{c + 1}:{row[c]:.6g}" for c in cols)]))
    return "\n".join(lines) + "\n"


@functools.cache
def generated(rows: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """A nearly linear binary set, the same direction for every seed: (x float32 as written, labels
    +-1, bz2 file bytes)."""
    w = np.random.default_rng(0).normal(size=features)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)) * (rng.random((rows, features)) < 0.6)
    x = np.float32(np.round(x, 3))
    labels = np.where(x @ w + 0.3 * rng.normal(size=rows) > 0, 1, -1)
    return x, labels, bz2.compress(libsvm_text(x, labels).encode())


def place_ijcnn1(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    spec = libsvm.LIBSVM_SETS["ijcnn1"]
    folder.mkdir(parents=True, exist_ok=True)
    x, y, blob = generated(spec.rows, spec.features, 1)
    (folder / spec.train_file).write_bytes(blob)
    (folder / spec.test_file).write_bytes(generated(spec.test_rows, spec.features, 2)[2])
    return x, y


@pytest.fixture
def clear_cache():
    D.load_dataset.cache_clear()
    yield
    D.load_dataset.cache_clear()


def test_parse_reads_sparse_rows_and_names_bad_lines():
    x, raw = libsvm.parse_libsvm("+1 1:0.5 3:-2\n-1 2:1e-3\n\n# a comment\n+1\n", 3)
    assert x.tolist() == [[0.5, 0.0, -2.0], [0.0, np.float32(1e-3), 0.0], [0.0, 0.0, 0.0]]
    assert raw.tolist() == [1.0, -1.0, 1.0]
    with pytest.raises(libsvm.LibsvmError, match=r"f.txt, line 2: feature index 4 outside 1..3"):
        libsvm.parse_libsvm("+1 1:1\n-1 4:1\n", 3, "f.txt")
    with pytest.raises(libsvm.LibsvmError, match="line 1"):
        libsvm.parse_libsvm("+1 1-1\n", 3)
    for bad in ("nan", "inf", "-inf", "1e39"):  # not a finite float32: refused, naming the line
        with pytest.raises(libsvm.LibsvmError, match=rf"line 2: feature value {bad} is not a finite float32"):
            libsvm.parse_libsvm(f"+1 1:1\n-1 2:{bad}\n", 3)
    with pytest.raises(libsvm.LibsvmError, match="line 1: label nan is not finite"):
        libsvm.parse_libsvm("nan 1:1\n", 3)
    x, _ = libsvm.parse_libsvm("+1 1:3.4e38 2:-3.4e38\n", 2)  # the float32 extremes themselves are kept
    assert np.isfinite(x).all() and x[0, 0] == np.float32(3.4e38)
    with pytest.raises(libsvm.LibsvmError, match="exactly 2 label values"):
        libsvm._classes(np.array([1.0, 2.0, 3.0]), "f")
    assert libsvm._classes(np.array([2.0, 1.0, 2.0]), "f").tolist() == [1, 0, 1]  # COVTYPE's 1/2


def test_ijcnn1_placed_by_hand_is_parsed_counted_and_trusted_on_first_use(tmp_path, clear_cache):
    x, y = place_ijcnn1(tmp_path / "ijcnn1")
    data = D.load_dataset("ijcnn1", str(tmp_path))
    assert isinstance(data, D.FeatureData) and data.input_shape == (22,) and data.spec.classes == 2
    assert data.train_images.shape == (49_990, 22) and data.test_images.shape == (91_701, 22)
    assert np.array_equal(data.train_images, x) and np.array_equal(data.train_labels, (y > 0).astype(np.int64))
    assert data.inputs(data.train_images[:3]).dtype.is_floating_point
    record = json.loads((tmp_path / "ijcnn1" / "sha256.json").read_text())
    assert set(record) == {"ijcnn1.bz2", "ijcnn1.t.bz2"} and all(len(v) == 64 for v in record.values())
    # a later use of another file is refused, naming both SHA-256s
    D.load_dataset.cache_clear()
    (tmp_path / "ijcnn1" / "ijcnn1.bz2").write_bytes(generated(49_990, 22, 3)[2])
    with pytest.raises(D.DataError, match=rf"has SHA-256 \w{{64}}, but {record['ijcnn1.bz2']} was recorded"):
        D.load_dataset("ijcnn1", str(tmp_path))


def test_wrong_counts_are_refused_with_the_expected_ones(tmp_path, clear_cache):
    folder = tmp_path / "ijcnn1"
    place_ijcnn1(folder)
    (folder / "ijcnn1.bz2").write_bytes(generated(49_989, 22, 1)[2])
    with pytest.raises(D.DataError, match="holds 49989 samples x 22 features, but ijcnn1's training file has 49990"):
        D.load_dataset("ijcnn1", str(tmp_path))


def test_fetched_over_http_then_used_offline(tmp_path, clear_cache, monkeypatch):
    """The download path, against a local HTTP server holding the site's file names; the second use
    reads the cache, with the server gone."""
    site = tmp_path / "site"
    x, _ = place_ijcnn1(site)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(libsvm, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        lines: list[str] = []
        folder = D.ensure_dataset("ijcnn1", tmp_path / "data", log=lines.append)
    finally:
        server.shutdown()
        server.server_close()
    assert any("downloading http://127.0.0.1" in line for line in lines)
    assert any("recorded SHA-256" in line for line in lines)
    assert (folder / "ijcnn1.bz2").read_bytes() == (site / "ijcnn1.bz2").read_bytes()
    data = D.load_dataset("ijcnn1", str(tmp_path / "data"))
    assert np.array_equal(data.train_images, x)


def test_no_internet_names_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(libsvm, "BASE_URL", "http://127.0.0.1:9/")  # the discard port: refused
    with pytest.raises(D.DataError, match=r"cannot download .*ijcnn1.bz2.*put ijcnn1.bz2 .*into"):
        D.ensure_dataset("ijcnn1", tmp_path)


def test_covtype_holds_out_a_seeded_tenth(tmp_path, clear_cache, monkeypatch):
    spec = libsvm.LibsvmSpec("covtype", "covtype.libsvm.binary.scale.bz2", 1_000, 54, holdout=0.1)
    monkeypatch.setitem(libsvm.LIBSVM_SETS, "covtype", spec)
    monkeypatch.setitem(D.LIBSVM_SETS, "covtype", spec)
    x, labels, _ = generated(1_000, 54, 4)
    folder = tmp_path / "covtype"
    folder.mkdir()
    (folder / "covtype.libsvm.binary.scale").write_text(libsvm_text(x, np.where(labels > 0, 2, 1)))  # uncompressed
    data = D.load_dataset("covtype", str(tmp_path))
    assert data.train_images.shape == (900, 54) and data.test_images.shape == (100, 54)
    together = np.concatenate([data.train_images, data.test_images])
    assert np.array_equal(np.unique(together, axis=0), np.unique(x, axis=0))  # a split, nothing lost
    D.load_dataset.cache_clear()
    again = D.load_dataset("covtype", str(tmp_path))  # from features.npz: the same split
    assert np.array_equal(again.test_images, data.test_images)
    cache = folder / "features.npz"
    cache.write_bytes(cache.read_bytes()[:300])  # damaged (a copy cut short): parsed again, not a BadZipFile
    D.load_dataset.cache_clear()
    assert np.array_equal(D.load_dataset("covtype", str(tmp_path)).test_images, data.test_images)
    assert cache.stat().st_size > 300  # and cached whole again


def test_logistic_regression_on_ijcnn1_closes_the_optimality_gap(tmp_path, clear_cache):
    """The convex experiment's pipeline on the set: two-class logistic regression, l2 weight, the
    optimality gap against the cached minimiser; mini-batch SGD + GM under sign-flip drives it down."""
    place_ijcnn1(tmp_path / "data" / "ijcnn1")
    cfg = resolve(
        {
            "dataset": "ijcnn1",
            "data-dir": str(tmp_path / "data"),
            "model": "logreg",
            "weight-decay": 0.02,
            "optimality-gap": True,
            "optimizer": "batch-sgd",
            "aggregator": "gm",
            "attack": "sign-flip",
            "num-honest": 10,
            "num-byzantine": 3,
            "lr": 0.5,
            "num-server-rounds": 600,
            "eval-every": 200,
            "checkpoint-every": 0,
            "results-dir": str(tmp_path / "runs"),
            "seed": 3,
        }
    )
    summary = run_local(cfg, log=lambda _: None)
    assert summary["status"] == "finished"
    runs = list((tmp_path / "runs").iterdir())
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["optimality_gap"] for r in records if "optimality_gap" in r]
    assert len(gaps) == 4 and all(g >= -1e-9 for g in gaps)
    assert gaps[-1] < 0.01 * gaps[0]  # measured: 0.42 -> 0.0013
    assert summary["final"]["test_accuracy"] > 0.9  # the generated labels are nearly linear
