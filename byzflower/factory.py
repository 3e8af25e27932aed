"""Build the pieces of an experiment from a validated run config (shared by all engines)."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from byzflower.config import ConfigError, RunConfig, build_component, layout_of, warnings_of
from byzflower.data import ImageData, PartitionError, load_dataset, partition
from byzflower.models import ModelError, build_model
from byzflower.records.experiment import Evaluator, Recorder
from byzflower.records.results import RunDirectory, default_results_dir
from clients.estimators import ESTIMATORS, Allocator, Estimator
from clients.gradients import ModelGradients
from clients.workers import WorkerData


def device_of(cfg: RunConfig) -> torch.device:
    """cfg['device'] resolved: 'auto' is CUDA when this process sees a GPU. On CUDA, convolutions
    are set to run in float32 and repeatably (``exact_convolutions``)."""
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this process sees no GPU (use device='auto' or 'cpu')")
    if cfg["device"] == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    exact_convolutions()
    return torch.device("cuda")


def exact_convolutions() -> None:
    """cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) and picks algorithms that may sum
    in a different order on every call, unless told not to. Measured on an H200 (2026-11-27, the small
    ``cnn``, 50 + 20 workers, ``benchmarks/gpu.py`` check): after one iteration the GPU's model was
    1.2-1.7e-4 (relative) away from the CPU's with TF32 and 0.75e-7 to 2e-6 without; after 20 iterations
    two GPU runs of the same seed differed by 4-5e-4 unless cuDNN was deterministic (then 0).
    Process-wide, like any cuDNN setting; the legacy TF32 switch, since setting only the new per-op
    one (``cudnn.conv.fp32_precision``) makes reading ``cudnn.allow_tf32`` raise."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def dataset_of(cfg: RunConfig) -> ImageData:
    return load_dataset(cfg["dataset"], cfg["data-dir"])


def partitions_of(cfg: RunConfig) -> tuple:
    """The honest workers' training-sample indices, one array per honest rank."""
    return partition(
        cfg["dataset"],
        cfg["data-dir"],
        int(cfg["num-honest"]),
        cfg["partitioner"],
        int(cfg["seed"]),
        float(cfg["dirichlet-alpha"]),
        int(cfg["pathological-classes"]),
    )


def objective_of(cfg: RunConfig, data: ImageData, grads: ModelGradients):
    """The honest workers' objective with its minimum (``optimality-gap=true``), else None."""
    if not cfg["optimality-gap"]:
        return None
    from byzflower.optimum import HonestObjective

    return HonestObjective(cfg, data, grads, partitions_of(cfg))


def recorder_of(
    cfg: RunConfig,
    data: ImageData,
    grads: ModelGradients,
    device: torch.device,
    log: Callable[[str], None],
    run: RunDirectory | None = None,
) -> Recorder:
    """The run's recorder (creating its folder unless ``run`` is given): the evaluator on the test
    set (and the optimality gap when asked), the Byzantine ids and the config's warnings."""
    objective = objective_of(cfg, data, grads)
    if objective is not None and objective.stale:
        log(
            f"the cached minimiser {objective.cache} was not this problem's (F there differs from the value "
            "saved with it: the data or the model changed since); solved again"
        )
    evaluator = Evaluator(cfg, data, grads, device, objective)
    recorder = Recorder(cfg, evaluator, log, run)
    recorder.byzantine_ids = list(layout_of(cfg).byzantine_ids)
    recorder.warnings = warnings_of(cfg)
    return recorder


def preflight(cfg: RunConfig) -> None:
    """The checks that need the data or this machine, made before any folder is created or
    any training starts (raises ConfigError naming the key)."""
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but this machine shows no GPU; use device='auto' or 'cpu'")
    _check_writable(cfg)
    data = dataset_of(cfg)
    try:  # importable (a user's) and usable on this data's samples, checked before any work
        _model_fits(cfg["model"], tuple(data.input_shape), data.spec.classes)
    except ModelError as exc:
        raise ConfigError(f"{exc} (dataset={cfg['dataset']!r})") from None
    samples = len(data.train_labels)
    if cfg["num-honest"] > samples:
        raise ConfigError(
            f"num-honest={cfg['num-honest']} exceeds the {samples} training samples of {cfg['dataset']}: "
            "every honest worker needs at least one sample"
        )
    try:
        parts = partitions_of(cfg)
    except PartitionError as exc:
        raise ConfigError(str(exc)) from None
    sizes = [len(p) for p in parts]
    smallest = min(sizes)
    worker = sizes.index(smallest)
    if smallest == 0:
        raise ConfigError(
            f"num-honest={cfg['num-honest']}: honest worker {worker} gets no training sample under "
            f"partitioner={cfg['partitioner']!r}; use fewer workers or a more even partitioner"
        )
    if cfg.batch_size > smallest:
        raise ConfigError(
            f"batch-size={cfg.batch_size} exceeds the {smallest} samples of honest worker {worker} "
            f"under partitioner={cfg['partitioner']!r}; lower batch-size, or use fewer workers or a "
            "more even partitioner"
        )


@functools.lru_cache(maxsize=16)
def _model_fits(name: str, input_shape: tuple[int, ...], classes: int) -> None:
    """Raises ModelError unless the model builds and maps samples of ``input_shape`` to ``classes``
    outputs; cached per process (a sweep checks every cell; a failed check is not cached)."""
    build_model(name, 0, input_shape, classes)


def _check_writable(cfg: RunConfig) -> None:
    root = Path(cfg["results-dir"] or default_results_dir()).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".byzflower-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"results-dir={str(root)!r} cannot be written: {exc.strerror or exc}") from None


def gradients_of(cfg: RunConfig, data: ImageData, device: torch.device) -> ModelGradients:
    model = build_model(cfg["model"], int(cfg["seed"]), data.input_shape, data.spec.classes).to(device)
    return ModelGradients(model, data.input_shape)


def worker_data(cfg: RunConfig, data: ImageData, workers: list[int], device: torch.device) -> WorkerData:
    """The training samples of ``workers`` (honest ids), on ``device``."""
    layout = layout_of(cfg)
    parts = partitions_of(cfg)
    return _samples_of(cfg, data, workers, [parts[layout.honest_rank(w)] for w in workers]).to(device)


def _samples_of(
    cfg: RunConfig, data: ImageData, workers: list[int], indices: list[np.ndarray], flip: int = 0
) -> WorkerData:
    """``workers``' training samples (``indices`` into the training set, one array per worker); labels
    y -> flip - 1 - y when ``flip``. With partitioner='full' every worker holds the whole set, stored once."""
    labels = torch.from_numpy(data.train_labels)
    if flip:
        labels = flip - 1 - labels
    if cfg["partitioner"] == "full":
        every = torch.from_numpy(np.unique(np.concatenate(indices)))
        position = torch.full((len(labels),), -1, dtype=torch.int64)
        position[every] = torch.arange(len(every))
        samples = data.inputs(data.train_images[every.numpy()])
        return WorkerData.shared(workers, samples, labels[every], [position[torch.from_numpy(i)] for i in indices])
    pieces = [(data.inputs(data.train_images[idx]), labels[torch.from_numpy(idx)]) for idx in indices]
    return WorkerData.from_parts(workers, pieces)


def byzantine_data(
    cfg: RunConfig, data: ImageData, workers: list[int], device: torch.device, classes: int = 10
) -> WorkerData:
    """Data of label-flipping Byzantine workers: the i-th Byzantine worker holds a copy of honest
    partition i mod H (data like the honest workers'), with labels y -> classes - 1 - y."""
    layout = layout_of(cfg)
    parts = partitions_of(cfg)
    indices = [parts[layout.byzantine_ids.index(w) % layout.num_honest] for w in workers]
    return _samples_of(cfg, data, workers, indices, flip=classes).to(device)


def make_estimator(
    cfg: RunConfig, grads: ModelGradients, data: WorkerData, allocate: Allocator | None = None
) -> Estimator:
    context = dict(
        grads=grads,
        data=data,
        batch_size=cfg.batch_size,
        weight_decay=float(cfg["weight-decay"]),
        seed=int(cfg["seed"]),
        allocate=allocate,
    )
    return build_component("optimizer", ESTIMATORS[cfg["optimizer"]], cfg, context)
