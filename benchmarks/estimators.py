"""Honest estimators in the paper's MNIST setup: seconds per iteration, SAGA's table build, memory.

50 honest workers (iid, 1,200 MNIST samples each), the paper's 784-50-10 MLP (39,760 parameters),
all workers in one group on the CPU (as the in-process engine runs them; a Flower node runs its
share with the same code). Seconds per iteration are the median over interleaved 100-iteration
blocks (SVRG's snapshots and SARAH's restarts amortised within each), so a shared machine's slow
spells hit every estimator alike. Targets: SAGA's state <= 1 GB (a dense table would be 9.5 GB);
a SAGA iteration <= 2x an SGD iteration with the same batch size.

Usage: python benchmarks/estimators.py [--iterations 500]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from byzflower.config import resolve
from byzflower.factory import dataset_of, gradients_of, worker_data
from byzflower.flower.node_state import mapped_allocator
from clients.estimators import SAGA, SARAH, SGD, SVRG


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BLOCK = 100  # iterations per timed block: one SVRG snapshot each, so snapshots are amortised


class Timed:
    """An estimator stepped in blocks of BLOCK iterations, the time of each block kept."""

    def __init__(self, est, x: torch.Tensor) -> None:
        self.est, self.x, self.t, self.blocks = est, x, 1, []
        self._step()  # the first step builds tables: timed apart

    def _step(self) -> None:
        self.x = self.x - 0.1 * self.est.step(self.x, self.t).mean(0)
        self.t += 1

    def block(self) -> None:
        start = time.perf_counter()
        for _ in range(BLOCK):
            self._step()
        self.blocks.append((time.perf_counter() - start) / BLOCK)

    @property
    def seconds(self) -> float:
        return statistics.median(self.blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = resolve({"num-honest": 50, "attack": "none"})
    data = dataset_of(cfg)
    grads = gradients_of(cfg, data, torch.device("cpu"))
    workers = worker_data(cfg, data, list(range(50)), torch.device("cpu"))
    x0 = grads.initial_point()
    n = int(workers.inputs.shape[0])
    print(f"50 workers, {n:,} samples, MLP with {grads.dim:,} parameters, torch threads {torch.get_num_threads()}")

    rss_before = rss_peak_mb()
    start = time.perf_counter()
    saga = SAGA(grads, workers, batch_size=1, seed=1)
    saga.step(x0, 1)
    build = time.perf_counter() - start
    state_bytes = sum(t.numel() * t.element_size() for t in saga.state.values())
    dense_bytes = n * grads.dim * 4 + 50 * grads.dim * 4
    rss_growth = rss_peak_mb() - rss_before
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        mapped = SAGA(grads, workers, batch_size=1, seed=1, allocate=mapped_allocator(Path(tmp)))
        mapped.step(x0, 1)
        build_mapped = time.perf_counter() - start
        timed_mapped = Timed(mapped, x0)
        for _ in range(max(1, args.iterations // BLOCK)):
            timed_mapped.block()
        t_mapped = timed_mapped.seconds

    candidates = [
        ("sgd (b=1)", SGD(grads, workers, batch_size=1, seed=1)),
        ("saga (b=1)", SAGA(grads, workers, batch_size=1, seed=1)),
        ("svrg (b=1, T=100)", SVRG(grads, workers, batch_size=1, seed=1, snapshot_interval=100)),
        ("sarah (b=1, T=100)", SARAH(grads, workers, batch_size=1, seed=1, restart_interval=100)),
        ("sgd (b=5)", SGD(grads, workers, batch_size=5, seed=1)),
        ("saga (b=5)", SAGA(grads, workers, batch_size=5, seed=1)),
        ("batch-sgd (b=50)", SGD(grads, workers, batch_size=50, seed=1)),
    ]
    timed = [(label, Timed(est, x0)) for label, est in candidates]
    # Interleaved blocks, median per estimator: a shared machine's slow spells hit all alike.
    for _ in range(max(1, args.iterations // BLOCK)):
        for _, t in timed:
            t.block()
    rows = [(label, t.seconds) for label, t in timed]
    times = dict(rows)
    print(f"\n{'estimator':<22}{'ms/iteration':>14}{'vs sgd, same b':>16}")
    for label, t in rows:
        b = label.split("b=")[1].split(",")[0].rstrip(")")
        ref = times.get(f"sgd (b={b})")
        ratio = f"{t / ref:.2f}x" if ref else ""
        print(f"{label:<22}{t * 1e3:>14.2f}{ratio:>16}")
    print(f"{'saga (b=1), mmap state':<22}{t_mapped * 1e3:>14.2f}{t_mapped / times['sgd (b=1)']:>15.2f}x")
    print(
        f"\nSAGA table build (first step, all 60,000 per-sample gradients): {build:.2f} s in memory, "
        f"{build_mapped:.2f} s memory-mapped"
    )
    print(
        f"SAGA state: {state_bytes / 2**20:.1f} MiB (table factors + running averages), against "
        f"{dense_bytes / 2**30:.2f} GiB for a dense per-sample table: {dense_bytes / state_bytes:.0f}x smaller"
    )
    print(f"process peak RSS growth while building it: {rss_growth:.0f} MiB")
    print("targets: state <= 1 GB; SAGA <= 2x SGD with the same batch size")


if __name__ == "__main__":
    main()
