"""Data sets in the Hugging Face `datasets` format (hub ids, local save_to_disk folders) and the ResNets.

The hub itself is out of reach here; a local folder in the same format goes through the same code
after ``datasets`` has opened it."""

import json

import datasets
import numpy as np
import pytest
import torch

from byzflower.config import ConfigError, resolve
from byzflower.data import DataError, load_dataset
from byzflower.data.hub import load_hub_dataset
from byzflower.engine import run_local


def _save(folder, shape, classes=3, train=60, test=20, seed=0, columns=("img", "fine_label"), splits=None):
    """A DatasetDict of random pictures with an Image and a ClassLabel column, saved with save_to_disk.
    Each class has its own mean brightness, so a model can learn it."""
    rng = np.random.default_rng(seed)
    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(num_classes=classes)})
    made, raw = {}, {}
    for split, n in (("train", train), ("test", test)):
        labels = rng.integers(0, classes, n)
        base = (labels * (200 // classes)).reshape(-1, *([1] * len(shape)))
        pictures = (base + rng.integers(0, 50, (n, *shape))).astype(np.uint8)
        raw[split] = (pictures, labels)
        made[split] = datasets.Dataset.from_dict(
            {columns[0]: list(pictures), columns[1]: labels.tolist()}, features=features
        )
    splits = splits or ("train", "test")
    datasets.DatasetDict({s: made[s] for s in splits}).save_to_disk(str(folder))
    return raw


def test_a_local_colour_folder_loads_as_channels_first_inputs_normalised_per_channel(tmp_path):
    raw = _save(tmp_path / "colour", (8, 8, 3))
    data = load_hub_dataset(str(tmp_path / "colour"), tmp_path / "cache")
    assert data.input_shape == (3, 8, 8) and data.spec.classes == 3
    assert np.array_equal(data.train_images, raw["train"][0]) and np.array_equal(data.test_labels, raw["test"][1])
    x = data.inputs(data.train_images)
    assert x.shape == (60, 3, 8, 8)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # the same pixel, by hand: channel 1 of picture 5 at (2, 3)
    expected = (raw["train"][0][5, 2, 3, 1] / 255.0 - data.spec.mean[1]) / data.spec.std[1]
    assert float(x[5, 1, 2, 3]) == pytest.approx(expected, rel=1e-5)


def test_decoded_arrays_are_cached_with_their_sha256_and_checked(tmp_path):
    _save(tmp_path / "grey", (6, 6))
    first = load_hub_dataset(str(tmp_path / "grey"), tmp_path / "cache")
    [cache] = list((tmp_path / "cache" / "hub").glob("*/arrays.npz"))
    stamp = cache.stat().st_mtime_ns
    again = load_hub_dataset(str(tmp_path / "grey"), tmp_path / "cache")
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(first.train_images, again.train_images)
    assert first.input_shape == (1, 6, 6) and isinstance(first.spec.mean, float)
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_labels"] = arrays["train_labels"][::-1].copy()  # tampered
    np.savez(cache, **arrays)
    with pytest.raises(DataError, match="does not match its recorded SHA-256"):
        load_hub_dataset(str(tmp_path / "grey"), tmp_path / "cache")
    cache.write_bytes(cache.read_bytes()[:100])  # cut short: named, not a BadZipFile traceback
    with pytest.raises(
        DataError, match=r"arrays\.npz is damaged \(BadZipFile: .*delete it to decode the data set again"
    ):
        load_hub_dataset(str(tmp_path / "grey"), tmp_path / "cache")


def test_unusable_folders_are_refused_with_the_reason(tmp_path):
    _save(tmp_path / "no-test", (4, 4), splits=("train",))
    with pytest.raises(DataError, match="has splits train; it needs 'train' and 'test'"):
        load_hub_dataset(str(tmp_path / "no-test"), tmp_path)
    _save(tmp_path / "odd", (4, 4), columns=("picture", "target"))
    ds = datasets.load_from_disk(str(tmp_path / "odd"))
    ds = ds.cast_column("target", datasets.Value("int64"))
    ds.save_to_disk(str(tmp_path / "odd2"))
    with pytest.raises(DataError, match="no label column among picture, target"):
        load_hub_dataset(str(tmp_path / "odd2"), tmp_path)
    with pytest.raises(DataError, match=r"is not a folder written by DatasetDict\.save_to_disk"):
        load_hub_dataset(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ConfigError, match=r"owner/name or \./folder"):
        resolve({"dataset": "cifar10"})


def test_a_run_from_run_config_alone_on_a_local_folder(tmp_path):
    """dataset='./folder' trains end to end (partitioned by flwr-datasets, evaluated on its test split)."""
    _save(tmp_path / "set", (6, 6), classes=3, train=300, test=90, seed=1)
    cfg = {
        "dataset": str(tmp_path / "set"),
        "data-dir": str(tmp_path / "cache"),
        "results-dir": str(tmp_path / "runs"),
        "run-name": "local-folder",
        "num-honest": 5,
        "num-byzantine": 1,
        "attack": "sign-flip",
        "aggregator": "median",
        "optimizer": "batch-sgd",
        "batch-size": 10,
        "num-server-rounds": 60,
        "eval-every": 60,
    }
    summary = run_local(resolve(cfg), log=lambda _: None)
    assert summary["status"] == "finished"
    assert summary["final"]["test_accuracy"] > 0.9  # three brightness levels: an easy task, learnt
    records = [json.loads(x) for x in (tmp_path / "runs" / "local-folder" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["iteration"] == 0 and records[0]["test_accuracy"] < summary["final"]["test_accuracy"]
    assert load_dataset(str(tmp_path / "set"), str(tmp_path / "cache")).spec.classes == 3


def test_resnets_use_groupnorm_and_their_per_sample_gradients_are_exact():
    """Per-sample gradients (what every estimator's messages are made of) of ResNet-18 equal
    autograd's, sample by sample. (Whole runs of a ResNet on 2 CPU cores take tens of seconds per
    iteration: see the README's limitations.)"""
    from byzflower.models import build_model
    from clients.gradients import ModelGradients

    model = build_model("resnet18", 3, (3, 8, 8), 4)
    norms = {type(m).__name__ for m in model.modules()}
    assert "GroupNorm" in norms and not any("BatchNorm" in n for n in norms)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    big = build_model("resnet50", 3, (1, 96, 96), 4)
    assert big.conv1.in_channels == 1 and big.conv1.stride == (2, 2) and big.fc.out_features == 4
    grads = ModelGradients(model, (3, 8, 8))
    x = grads.initial_point()
    inputs, targets = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 3])
    rows = grads.combine(grads.sample_grads(x, inputs, targets), torch.ones(2, 1))  # 2 groups of 1
    for i in range(2):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert float((rows[i] - expected).norm()) <= 1e-5 * float(expected.norm())  # float32 sums, reordered


def test_a_cache_built_by_several_writers_at_once_ends_whole(tmp_path):
    """Runs started together (a sweep, or threads in one process) may each build the same cache: each
    writes its own temporary file and renames it into place, so every writer succeeds and the cache
    reads back whole. (With one temporary name per process, a thread's rename found the file gone.)"""
    import threading

    from byzflower.data.hub import _read_cache, _write_cache

    arrays = {"train_images": np.arange(200_000, dtype=np.uint8).reshape(-1, 4), "classes": np.array(3)}
    cache = tmp_path / "arrays.npz"
    start, errors = threading.Barrier(4), []

    def write():
        start.wait()
        for _ in range(5):
            try:
                _write_cache(cache, arrays)
            except OSError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert np.array_equal(_read_cache(cache)["train_images"], arrays["train_images"])
    assert [p.name for p in tmp_path.iterdir()] == ["arrays.npz"]  # no temporary file left
