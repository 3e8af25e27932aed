"""Any image-classification data set in the Hugging Face ``datasets`` format, by id or folder.

``dataset=`` takes, besides the built-in IDX sets, a Hugging Face / Flower Datasets id
(``owner/name``, e.g. ``uoft-cs/cifar10``; downloaded by ``datasets`` on a machine with internet)
or a local folder written by ``DatasetDict.save_to_disk`` (offline). It needs a ``train`` and a
``test`` split, one image column (an ``Image`` feature, or a column named image/img) and one
integer label column (a ``ClassLabel`` feature, or a column named label/labels/fine_label).

The decoded arrays are cached once in ``<data-dir>/hub/<name>-<fingerprint>/arrays.npz`` with the
SHA-256 of their bytes, checked on every later use; the fingerprint is the one ``datasets`` gives
the splits' contents, so a changed folder or a new revision of the set gets a new cache. Inputs are
normalised per channel with the training set's own mean and standard deviation.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from byzflower.atomic import DAMAGED_NPZ, cache_npz
from byzflower.data import DataError, DatasetSpec, ImageData, default_data_dir

IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "fine_label")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def folder_of(name: str, data_dir: str | Path | None) -> Path:
    """Where ``name``'s arrays and partitions are cached (the folder exists afterwards)."""
    splits = _open(name)
    key = hashlib.sha256("|".join([name, *(_fingerprint(splits[s]) for s in ("train", "test"))]).encode())
    slug = _SLUG.sub("_", name.strip("/"))[-60:]
    folder = (
        (Path(data_dir).expanduser() if data_dir else default_data_dir()) / "hub" / f"{slug}-{key.hexdigest()[:16]}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_hub_dataset(name: str, data_dir: str | Path | None = None) -> ImageData:
    """The data set ``name`` (hub id or local folder) as uint8 images and int64 labels."""
    folder = folder_of(name, data_dir)
    cache = folder / "arrays.npz"
    if cache.exists():
        arrays = _read_cache(cache)
    else:
        arrays = _decode(name, _open(name))
        _write_cache(cache, arrays)
    train = arrays["train_images"]
    axes = None if train.ndim == 3 else (0, 1, 2)  # one channel: one figure; else one per channel
    mean = np.atleast_1d(train.mean(axis=axes, dtype=np.float64) / 255.0)
    std = np.atleast_1d(train.std(axis=axes, dtype=np.float64) / 255.0)
    if (std <= 0).any():
        raise DataError(f"dataset={name!r}: a channel of the training images is constant")
    norm = (float(mean[0]), float(std[0])) if train.ndim == 3 else (tuple(mean.tolist()), tuple(std.tolist()))
    spec = DatasetSpec(name, {}, norm[0], norm[1], name, classes=int(arrays["classes"]))
    return ImageData(
        spec,
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
    )


@functools.lru_cache(maxsize=4)
def _open(name: str) -> Any:
    """The DatasetDict of a local folder or a hub id (``datasets`` caches what it downloads; the
    opened splits are memory-mapped, kept per process so the cache folder, the arrays and the
    partitions do not each open them again)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset={name!r} needs the `datasets` package (pip install datasets)") from None
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            splits = datasets.load_from_disk(str(path))
        elif path.exists() or name.startswith((".", "/", "~")):
            raise DataError(f"dataset={name!r} is not a folder written by DatasetDict.save_to_disk")
        else:
            splits = datasets.load_dataset(name)
    except DataError:
        raise
    except Exception as exc:  # no internet, an unknown id, a folder in another format
        raise DataError(f"dataset={name!r} could not be loaded: {type(exc).__name__}: {exc}") from None
    if not isinstance(splits, datasets.DatasetDict):
        raise DataError(f"dataset={name!r} holds one split; it needs a DatasetDict with 'train' and 'test'")
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        raise DataError(f"dataset={name!r} has splits {', '.join(splits)}; it needs 'train' and 'test'")
    return splits


def _fingerprint(split: Any) -> str:
    return str(getattr(split, "_fingerprint", "") or len(split))


def _columns(split: Any, name: str) -> tuple[str, str, int | None]:
    """(image column, label column, number of classes if the features say it)."""
    import datasets

    features = split.features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)] or [
        c for c in IMAGE_NAMES if c in features
    ]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)] or [
        c for c in LABEL_NAMES if c in features
    ]
    if not images or not labels:
        raise DataError(
            f"dataset={name!r}: no {'image' if not images else 'label'} column among {', '.join(features)} "
            f"(an Image feature or one of {', '.join(IMAGE_NAMES)}; a ClassLabel feature or one of "
            f"{', '.join(LABEL_NAMES)})"
        )
    label = labels[0]
    classes = features[label].num_classes if isinstance(features[label], datasets.ClassLabel) else None
    return images[0], label, classes


def _decode(name: str, splits: Any) -> dict[str, np.ndarray]:
    image, label, classes = _columns(splits["train"], name)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        table = splits[split].with_format("numpy")
        try:
            pictures = np.stack([np.asarray(x) for x in table[image]])
        except ValueError as exc:
            raise DataError(f"dataset={name!r}: the {split} images differ in shape ({exc})") from None
        if pictures.dtype != np.uint8 or pictures.ndim not in (3, 4):
            raise DataError(
                f"dataset={name!r}: {split} images are {pictures.dtype} of shape {pictures.shape[1:]}; "
                "expected 8-bit (H, W) or (H, W, C) pictures"
            )
        out[f"{split}_images"] = pictures
        out[f"{split}_labels"] = np.asarray(table[label]).astype(np.int64)
    top = int(max(out["train_labels"].max(), out["test_labels"].max())) + 1
    if min(out["train_labels"].min(), out["test_labels"].min()) < 0:
        raise DataError(f"dataset={name!r}: labels must be 0..K-1, found negative ones")
    out["classes"] = np.array(max(classes or 0, top))
    return out


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key != "sha256":
            h.update(key.encode())
            h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    cache_npz(cache, **arrays, sha256=np.array(_digest(arrays)))


def _read_cache(cache: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
    except DAMAGED_NPZ as exc:
        raise DataError(
            f"{cache} is damaged ({type(exc).__name__}: {exc}); delete it to decode the data set again"
        ) from None
    if str(arrays.pop("sha256", "")) != _digest(arrays):
        raise DataError(f"{cache} does not match its recorded SHA-256; delete it to decode the data set again")
    return arrays
