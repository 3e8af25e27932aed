"""The in-process engine's steady-state iteration on CPU and GPU, side by side.

For the paper's MNIST setups (50 honest + 20 Byzantine workers, the 784-50-10 MLP, real MNIST; two with
the small conv net ``cnn``) and each
device given, it prints per iteration: wall time, device-busy time (sum of GPU kernel times; CPU: none),
kernel launches, synchronisations (host waits on the device: ``.item()``/``bool()`` reads, data-dependent
shapes, blocking copies), host-to-device copies, and tensors built from host data. The counts come from
torch.profiler over steady-state iterations (after the first, which fills tables and warms caches), so
they show what stands between the iteration and the device's speed. On CPU a "synchronisation" costs
nothing, but the count is the same code path's, so it shows what a GPU run would wait on.

``--check`` also runs the same iterations on CPU and on the GPU from the same start and prints the
largest difference of the model and of the per-iteration figures (relative to their scale).
``--full N`` times a whole N-iteration run (evaluations and records included) with ``run_local``.
``--device-branches N`` (on a machine without a GPU) runs N steady-state iterations on the CPU with the
branches a GPU takes (decisions by kernels, speculation, noise drawn inline) and counts, per iteration,
the ops that read a value back, build a tensor from host data, or make a data-dependent shape, seen by
a torch dispatch probe: what a GPU would wait for or copy. (Host-side work on host tensors after a read,
such as Krum's selection on the Gram matrix, is counted too: on the CPU the probe cannot tell them apart.)
``--cpu-spread N`` gives ``--check``'s yardsticks on the CPU alone: how far N iterations carry a start one
float32 ulp away (the trajectory's own sensitivity), and how far the GPU's branches run on the CPU move
the model (its logic, without its arithmetic); a GPU difference beyond both comes from GPU arithmetic.
``--host N`` profiles N steady-state iterations with cProfile and prints where the host's time goes
(the functions with the most time of their own, in ms per iteration), since on a GPU the host is
what the iteration waits for. ``--weiszfeld N`` weighs the geometric median's two ways on one
steady-state round of SAGA + GM: the host's numpy Weiszfeld (as run: the Gram matrix read back,
iterations until converged) against a fixed number of masked steps on the device (no read), eager
and replayed from a CUDA graph, each the mean of N calls.

Usage: python benchmarks/gpu.py [--devices cpu,cuda] [--iterations 300] [--profile 30] [--check 30] [--full 15000]
       [--host 100] [--weiszfeld 50] [--device-branches 20] [--cpu-spread 20]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzflower.config import resolve  # noqa: E402
from byzflower.engine import LocalRun, run_local  # noqa: E402

SETUPS = {
    "saga-gm-gaussian": {"optimizer": "saga", "aggregator": "gm", "attack": "gaussian"},
    "saga-gm-zero": {"optimizer": "saga", "aggregator": "gm", "attack": "zero-gradient"},
    "sgd-mean": {"optimizer": "sgd", "aggregator": "mean", "attack": "none"},
    "batchsgd-median-signflip": {"optimizer": "batch-sgd", "aggregator": "median", "attack": "sign-flip"},
    "saga-krum-signflip": {"optimizer": "saga", "aggregator": "krum", "attack": "sign-flip"},
    # The small conv net: its dense (conv) parameters take per-worker gradients in SGD-type estimators
    # and per-sample rows in SAGA's table.
    "batchsgd-cnn-gm-signflip": {"model": "cnn", "optimizer": "batch-sgd", "aggregator": "gm", "attack": "sign-flip"},
    "saga-cnn-gm-zero": {"model": "cnn", "optimizer": "saga", "aggregator": "gm", "attack": "zero-gradient"},
}
BASE = {"num-honest": 50, "num-byzantine": 20, "seed": 1, "eval-every": 1_000_000, "checkpoint-every": 0}
MARKS = (1, 2, 5, 10, 20)  # iterations at which differences are shown on the way (the last one too)

# Host-side events that mean the host waits for the device, or copies to it.
SYNC_EVENTS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive"}
FIGURES = ("busy_ms", "launches", "syncs", "scalar_reads", "h2d", "host_tensors")
LAUNCH_EVENTS = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}


def config(setup: dict, device: str, results: str, rounds: int) -> object:
    """``device`` is cpu, cuda, or cuda-eager (cuda without CUDA graphs)."""
    extra = {"cuda-graphs": False} if device == "cuda-eager" else {}
    device = "cuda" if device == "cuda-eager" else device
    return resolve({**BASE, **setup, **extra, "device": device, "results-dir": results, "num-server-rounds": rounds})


def synchronize(device: object) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(setup: dict, device: str, rounds: int) -> LocalRun:
    tmp = tempfile.mkdtemp(prefix="byzflower-gpu-")
    return LocalRun(config(setup, device, tmp, rounds), log=lambda _: None)


def timed(run: LocalRun, first: int, count: int) -> float:
    synchronize(run.cfg["device"])
    start = time.perf_counter()
    for t in range(first, first + count):
        run.step(t)
    synchronize(run.cfg["device"])
    return (time.perf_counter() - start) / count


def profiled(run: LocalRun, first: int, count: int) -> dict[str, float]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = run.cfg["device"].startswith("cuda")
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(run.cfg["device"])
    with torch.profiler.profile(activities=activities) as prof:
        for t in range(first, first + count):
            run.step(t)
        synchronize(run.cfg["device"])
    names: Counter[str] = Counter()
    busy_us = 0.0
    h2d = 0
    for e in prof.events():
        names[e.name] += 1
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            if "Memcpy HtoD" in e.name:
                h2d += 1
            busy_us += e.device_time
    final_syncs = 1 if cuda else 0  # the synchronize() that closes the window
    syncs = sum(names[n] for n in SYNC_EVENTS) - final_syncs if cuda else sum(names[n] for n in SYNC_OPS)
    return {
        "busy_ms": busy_us / 1000 / count if cuda else float("nan"),
        "launches": sum(names[n] for n in LAUNCH_EVENTS) / count,
        "syncs": max(syncs, 0) / count,
        "scalar_reads": names["aten::_local_scalar_dense"] / count,
        "h2d": h2d / count,
        "host_tensors": names["aten::lift_fresh"] / count,
    }


def host_profile(run: LocalRun, first: int, count: int, top: int = 12) -> list[tuple[str, float]]:
    """(function, ms of its own per iteration) for the ``top`` functions, over ``count`` iterations."""
    prof = cProfile.Profile()
    prof.enable()
    for t in range(first, first + count):
        run.step(t)
    synchronize(run.cfg["device"])
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, tottime, cumtime, callers)
    rows = sorted(((f"{Path(k[0]).name}:{k[2]}", v[2] * 1000 / count) for k, v in stats.items()), key=lambda r: -r[1])
    return rows[:top]


def check(setup: dict, iterations: int) -> dict[str, float]:
    """Largest differences between CPU and GPU after the same iterations from the same start (the
    model's also at iterations 1, 2, 5 and 10: "@t"), and between two GPU runs ("rerun": 0 when the GPU
    repeats its own numbers bit for bit)."""
    runs = {d: build(setup, d.split("#")[0], iterations + 1) for d in ("cpu", "cuda", "cuda#2")}
    scale = float(runs["cpu"].x.abs().max())
    growth = {}  # the model's difference at a few iterations on the way: where a gap opens
    for t in range(1, iterations + 1):
        for r in runs.values():
            r.step(t)
        if t in MARKS and t < iterations:
            growth[f"@{t}"] = float((runs["cpu"].x - runs["cuda"].x.cpu()).abs().max()) / scale
    xc, xg = runs["cpu"].x, runs["cuda"].x.cpu()
    lc, lg = runs["cpu"].recorder.evaluate(iterations, xc), runs["cuda"].recorder.evaluate(iterations, runs["cuda"].x)
    keys = ("test_loss", "honest_variance", "aggregate_distance")
    out = {**growth, "model": float((xc - xg).abs().max()) / scale}
    out["rerun"] = float((runs["cuda#2"].x.cpu() - xg).abs().max()) / scale
    for k in keys:
        if isinstance(lc.get(k), float):
            out[k] = abs(lc[k] - lg[k]) / max(abs(lc[k]), 1e-30)
    return out


def device_weiszfeld(g: torch.Tensor, alpha: torch.Tensor, spread: float, floor: float, tol: float, steps: int):
    """``steps`` Weiszfeld steps on the coefficients (as ``kernels.weiszfeld``, without Vardi and
    Zhang's rule for an iterate on a message), frozen by an on-device mask once a step moves at most
    tol * spread: the same result as the host's loop, with no read, at the price of always running
    ``steps`` steps."""
    diag = g.diagonal()
    done = torch.zeros((), dtype=torch.bool, device=g.device)
    for _ in range(steps):
        ga = g @ alpha
        dist = (diag - 2.0 * ga + alpha @ ga).clamp_min_(0.0).sqrt_()
        w = torch.where(dist <= floor, 0.0, 1.0 / dist.clamp_min(floor))
        new = w / w.sum()
        delta = new - alpha
        step = (delta @ (g @ delta)).clamp_min(0.0).sqrt() / spread
        alpha = torch.where(done, alpha, new)
        done = done | (step <= tol)
    return alpha


def weiszfeld_ways(calls: int) -> dict[str, float]:
    """ms per call of the geometric median's Weiszfeld on the host (read included) and on the device."""
    from strategies import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU: the logic alone, no graph
    run = build(SETUPS["saga-gm-zero"], device, 40)
    for t in range(1, 31):
        run.step(t)
    messages = run._messages
    rule = run.rule
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        gram = kernels.centered_gram(messages)  # the device's product and its one read
    read_ms = (time.perf_counter() - start) * 1000 / calls
    start = time.perf_counter()
    for _ in range(calls):
        gram._host = None  # the numpy side formed afresh, as each round does
        alpha, used, _ = kernels.weiszfeld(gram, rule.tol, rule.max_iter, rule.eps)
    host_ms = (time.perf_counter() - start) * 1000 / calls
    start0, spread = kernels.robust_start(gram)
    spread = spread or 1.0
    floor = max(rule.eps * spread, (gram.resolution) ** 0.5)
    g = gram.matrix.to(device)
    a0 = torch.from_numpy(start0).to(device)
    out = {"host_read_ms": read_ms, "host_weiszfeld_ms": host_ms, "host_iterations": used}
    for steps in (used, rule.max_iter):
        device_weiszfeld(g, a0, spread, floor, rule.tol, steps)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            got = device_weiszfeld(g, a0, spread, floor, rule.tol, steps)
        synchronize(device)
        out[f"device_eager_{steps}_ms"] = (time.perf_counter() - start) * 1000 / calls
        out[f"device_{steps}_max_alpha_diff"] = float(abs(got.cpu().numpy() - alpha).max())
        if device == "cpu":
            continue
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            device_weiszfeld(g, a0, spread, floor, rule.tol, steps)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = device_weiszfeld(g, a0, spread, floor, rule.tol, steps)
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            graph.replay()
        torch.cuda.synchronize()
        out[f"device_graph_{steps}_ms"] = (time.perf_counter() - start) * 1000 / calls
        out[f"device_{steps}_eager_vs_graph"] = float((captured - got).abs().max())
    return out


ROUND_TRIPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "lift_fresh", "unique"}


@contextlib.contextmanager
def gpu_branches() -> Iterator[None]:
    """Inside, a CPU run takes the branches a GPU takes (decisions by kernels, inline noise)."""
    from clients import attacks
    from strategies import kernels

    saved = kernels.reads_are_free, attacks.draws_inline
    kernels.reads_are_free, attacks.draws_inline = (lambda t: False), (lambda device: True)
    try:
        yield
    finally:
        kernels.reads_are_free, attacks.draws_inline = saved


def device_branches(setup: dict, count: int) -> dict[str, float]:
    """Per iteration, the ops of ROUND_TRIPS (and boolean-mask indexing) on the GPU's branches, run on the CPU."""
    from collections import defaultdict

    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict[str, int] = defaultdict(int)

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            masked = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None
            )
            if name in ROUND_TRIPS or name.startswith("unique") or masked:
                seen["boolean-mask" if masked else name] += 1
            return func(*args, **(kwargs or {}))

    with gpu_branches():
        run = build(setup, "cpu", count + 6)
        run.speculate = True
        for t in range(1, 6):  # SAGA fills its table
            run.step(t)
        with Probe():
            for t in range(6, 6 + count):
                run.step(t)
    return {k: v / count for k, v in sorted(seen.items())}


def marks_until(iterations: int) -> list[int]:
    return [t for t in MARKS if t < iterations] + [iterations]


def cpu_spreads(setup: dict, iterations: int) -> dict[str, list[float]]:
    """What a CPU/GPU difference should be measured against, on the CPU alone: the largest model
    difference (relative to the largest entry) at ``marks_until(iterations)`` between the CPU run and (``ulp``) the
    same run started one float32 ulp away (x0 * (1 + 2^-23)): how far the trajectory itself grows
    rounding differences; (``branches``) the same run on the GPU's branches (decisions by kernels,
    float64 Gram matrices, speculation, inline noise): how far the GPU's logic alone moves it."""
    base, ulp, branches = (build(setup, "cpu", iterations + 1) for _ in range(3))
    ulp.x.mul_(1 + 2**-23)
    branches.speculate = True
    scale = float(base.x.abs().max())
    marks = marks_until(iterations)
    out: dict[str, list[float]] = {"ulp": [], "branches": []}
    for t in range(1, iterations + 1):
        base.step(t)
        ulp.step(t)
        with gpu_branches():
            branches.step(t)
        if t in marks:
            out["ulp"].append(float((ulp.x - base.x).abs().max()) / scale)
            out["branches"].append(float((branches.x - base.x).abs().max()) / scale)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated names from: " + ", ".join(SETUPS))
    p.add_argument("--iterations", type=int, default=300, help="timed steady-state iterations per setup (0: none)")
    p.add_argument("--profile", type=int, default=30, help="profiled iterations per setup")
    p.add_argument("--check", type=int, default=0, help="iterations of the CPU/GPU equality check (0: skip)")
    p.add_argument("--full", type=int, default=0, help="time a whole run of this many iterations per device")
    p.add_argument("--host", type=int, default=0, help="cProfile this many iterations per setup (0: skip)")
    p.add_argument("--device-branches", type=int, default=0, help="iterations of the GPU branches' count on the CPU")
    p.add_argument("--weiszfeld", type=int, default=0, help="calls per way of the Weiszfeld comparison (0: skip)")
    p.add_argument("--cpu-spread", type=int, default=0, help="iterations of the CPU-alone yardsticks for --check")
    p.add_argument("--json", default="", help="also write the figures to this file")
    args = p.parse_args()
    devices = args.devices.split(",")
    setups = [s.strip() for s in args.setups.split(",")]
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        p.error(f"unknown setups {bad}; valid: {', '.join(SETUPS)}")
    rows = []
    print(f"torch {torch.__version__}; " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"))
    header = f"{'setup':32} {'device':6} {'ms/it':>8} {'busy ms':>8} {'launch':>7} {'sync':>6} {'item':>6} {'h2d':>5}"
    if args.iterations:
        print(header)
    for name in setups if args.iterations else []:  # --iterations 0: only the checks asked for
        for device in devices:
            warm = 5
            run = build(SETUPS[name], device, warm + args.iterations + args.profile + args.host + 1)
            timed(run, 1, warm)  # the first iteration fills SAGA's table
            ms = timed(run, warm + 1, args.iterations) * 1000
            try:
                prof = profiled(run, warm + args.iterations + 1, args.profile)
            except Exception as exc:  # a profiler missing on some machine: keep the timings
                print(f"  (profiler failed: {exc})")
                prof = dict.fromkeys(FIGURES, float("nan"))
            graphs = getattr(run.workers.estimator, "fallback", "n/a")
            if graphs is not None and device != "cpu":
                print(f"  (CUDA graphs not used: {graphs})")
            row = {"setup": name, "device": device, "ms_per_iteration": ms, **prof}
            if args.host:
                row["host"] = host_profile(run, warm + args.iterations + args.profile + 1, args.host)
            rows.append(row)
            print(
                f"{name:32} {device:6} {ms:8.3f} {prof['busy_ms']:8.3f} {prof['launches']:7.1f} "
                f"{prof['syncs']:6.1f} {prof['scalar_reads']:6.1f} {prof['h2d']:5.1f}",
                flush=True,
            )
            for fn, ms_own in row.get("host", []):
                print(f"    host {ms_own:7.3f} ms/it  {fn}")
    if len(devices) > 1 and args.iterations:
        print("\nspeed-up of", devices[1], "over", devices[0])
        for name in setups:
            a, b = (next(r for r in rows if r["setup"] == name and r["device"] == d) for d in devices[:2])
            print(f"  {name:32} {a['ms_per_iteration'] / b['ms_per_iteration']:6.1f}x")
    if args.check:
        print(f"\nCPU vs GPU after {args.check} iterations (relative differences)")
        for name in setups:
            diff = check(SETUPS[name], args.check)
            rows.append({"setup": name, "check": diff})
            print(f"  {name:32} " + "  ".join(f"{k} {v:.1e}" for k, v in diff.items()), flush=True)
    if args.full:
        print(f"\nwhole runs of {args.full} iterations (run_local, evaluations every 500)")
        for name in setups:
            for device in devices:
                tmp = tempfile.mkdtemp(prefix="byzflower-gpu-")
                cfg = resolve(
                    {**BASE, **SETUPS[name], "device": device, "results-dir": tmp, "num-server-rounds": args.full}
                    | {"eval-every": 500}
                )
                start = time.perf_counter()
                summary = run_local(cfg, log=lambda _: None)
                wall = time.perf_counter() - start
                acc = summary["final"].get("test_accuracy")
                rows.append({"setup": name, "device": device, "full_s": wall, "test_accuracy": acc})
                print(f"  {name:32} {device:6} {wall:8.1f} s  test accuracy {acc}", flush=True)
    if args.device_branches:
        print(f"\nGPU branches on the CPU: round trips per steady-state iteration, {args.device_branches} iterations")
        for name in setups:
            counts = device_branches(SETUPS[name], args.device_branches)
            rows.append({"setup": name, "device_branches": counts})
            shown = ", ".join(f"{k} {v:g}" for k, v in counts.items()) or "none"
            print(f"  {name:32} {shown}", flush=True)
    if args.cpu_spread:
        marks = marks_until(args.cpu_spread)
        print(f"\nOn the CPU alone, model differences at iterations {marks}: started one ulp away; the GPU's branches")
        for name in setups:
            spread = cpu_spreads(SETUPS[name], args.cpu_spread)
            rows.append({"setup": name, "cpu_spread": spread})
            for k, v in spread.items():
                print(f"  {name:32} {k:9}" + " ".join(f"{x:8.1e}" for x in v), flush=True)
    if args.weiszfeld:
        ways = weiszfeld_ways(args.weiszfeld)
        rows.append({"weiszfeld": ways})
        print("\nthe geometric median's Weiszfeld, host (numpy, after one read) vs device (fixed masked steps)")
        for k, v in ways.items():
            print(f"  {k:32} {v:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
