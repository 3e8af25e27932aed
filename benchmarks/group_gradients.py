"""Dense parameters' worker gradients: per-sample rows summed (before) against one gradient per worker.

SGD, mini-batch SGD, SVRG, SARAH and worker momentum send each worker's weighted mean gradient
over its sampled rows. For parameters that are not an nn.Linear's (convolutions, norms) that sum
was formed from per-sample gradient rows (``sample_grads`` + ``combine``); it now comes from one
gradient of each worker's weighted loss, vmapped over the chunk's workers (``group_grads``).
Both are timed here side by side, alternating, on one chunk of 25 workers (the estimators'
fixed chunk), on one thread as the estimators run them; "rows" is the size of the per-sample
dense rows the old way formed for that chunk (the new way forms 25 rows, one per worker).

On a GPU (``--device cuda``) convolutions run as in a run (float32, deterministic: not cuDNN's
defaults), times are taken after a synchronisation, and the per-sample way may not fit in memory
for large b (it is then reported as such and only the per-worker way is timed).

Usage: python benchmarks/group_gradients.py [--repeats 3] [--resnet] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from byzflower.factory import exact_convolutions
from byzflower.models import build_model
from clients.gradients import ModelGradients
from clients.workers import CHUNK


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        begin = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - begin)
    return best


def compare(name: str, shape: tuple[int, ...], b: int, repeats: int, device: str = "cpu") -> None:
    G = ModelGradients(build_model(name, 0, shape, 10).to(device), shape)
    gen = torch.Generator().manual_seed(0)
    x = G.initial_point()
    inputs = torch.randn(CHUNK * b, *shape, generator=gen).to(device)
    targets = torch.randint(0, 10, (CHUNK * b,), generator=gen).to(device)
    w = torch.full((CHUNK, b), 1.0 / b, device=device)

    def before() -> torch.Tensor:
        return G.combine(G.sample_grads(x, inputs, targets), w)

    def after() -> torch.Tensor:
        return G.group_grads(x, inputs, targets, w)

    rows_mb = CHUNK * b * G.dense_dim * 4 / 1e6
    try:
        gap = float((before() - after()).abs().max() / before().abs().max())
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        new = seconds(after, repeats, device)
        print(f"{name:<10}{b:>4}{rows_mb:>11.1f}{'out of memory':>15}{new * 1e3:>15.1f}")
        return
    old = new = float("inf")
    for _ in range(repeats):  # alternating, so both see the same machine
        old = min(old, seconds(before, 1, device))
        new = min(new, seconds(after, 1, device))
    print(
        f"{name:<10}{b:>4}{rows_mb:>11.1f}{old * 1e3:>15.1f}{new * 1e3:>15.1f}{old / new:>9.2f}x"
        f"   (largest difference {gap:.1e} of the largest entry)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet", action="store_true", help="also ResNet-18 on CIFAR-shaped inputs (minutes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.device == "cuda":
        exact_convolutions()  # as a run on the GPU does
    print(f"torch {torch.__version__} on " + (torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"))
    cases = [("cnn", (1, 28, 28), b) for b in (1, 5, 50)]
    if args.resnet:
        cases += [("resnet18", (3, 32, 32), b) for b in ((1, 5, 50) if args.device == "cuda" else (1, 5))]
    print(f"{'model':<10}{'b':>4}{'rows (MB)':>11}{'per-sample ms':>15}{'per-worker ms':>15}{'speed-up':>10}")
    for name, shape, b in cases:
        compare(name, shape, b, args.repeats, args.device)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
