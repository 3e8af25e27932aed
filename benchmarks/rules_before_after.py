"""Every rule's time per call, this tree against an earlier commit, side by side in one run.

The earlier commit's ``strategies/`` is extracted with ``git archive`` into a temporary folder and
timed in its own process; the two trees alternate block by block (best of each block), so both
see the same machine load. Messages: 50 honest (a shared mean plus noise) + 20 Gaussian
attackers, n = 70, float32, and the attack at the extremes (+-1e20 copies) where the new code
takes its float64 path.

Usage: python benchmarks/rules_before_after.py [--base REV] [--dims 39760,1000000] [--blocks 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from strategies.aggregators import (NNM, Bulyan, CenteredClipping, GeometricMedian, Krum, Mean, Median,
    MultiKrum, TrimmedMean)
dims = [int(x) for x in sys.argv[1].split(",")]
rules = {"mean": Mean(), "gm": GeometricMedian(), "krum": Krum(20), "multi-krum": MultiKrum(20),
         "median": Median(), "trimmed-mean": TrimmedMean(20), "bulyan (f=16)": Bulyan(16),
         "centered-clipping": CenteredClipping(init="median"), "nnm+gm": NNM(GeometricMedian(), 20)}
out = {}
for d in dims:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(d, generator=g) * 0.05
    honest = mu + torch.randn(50, d, generator=g) * 0.02
    cases = {"gaussian": torch.cat([honest, honest.mean(0) + 30 * torch.randn(20, d, generator=g)]),
             "copies 1e20": torch.cat([honest, torch.full((20, d), 1e20)])}
    for case, m in cases.items():
        m = m.contiguous()
        for name, rule in rules.items():
            if case != "gaussian" and name not in ("gm", "krum", "centered-clipping"):
                continue
            rule(m)
            best = float("inf")
            for _ in range(3 if d > 100_000 else 7):
                t = time.perf_counter(); v = rule(m).vector; best = min(best, time.perf_counter() - t)
            out[f"{d}|{case}|{name}"] = [best, bool(torch.isfinite(v).all())]
print(json.dumps(out))
"""


def run(tree: Path, dims: str) -> dict[str, list]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", WORKER, dims], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", default="HEAD", help="the earlier commit (default: HEAD, i.e. before uncommitted work)"
    )
    parser.add_argument("--dims", default="39760,1000000")
    parser.add_argument("--blocks", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="byzflower-base-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.base, "strategies"], capture_output=True, check=True
        ).stdout
        tar = Path(tmp) / "base.tar"
        tar.write_bytes(archive)
        with tarfile.open(tar) as t:
            t.extractall(tmp, filter="data")
        base_runs, new_runs = [], []
        for _ in range(args.blocks):  # alternate, so both trees see the same load
            base_runs.append(run(Path(tmp), args.dims))
            new_runs.append(run(ROOT, args.dims))
    print(f"per call, best of {args.blocks} blocks; base = {args.base}, new = this tree; n = 70, float32, 2 threads")
    print(f"{'d':>9}  {'messages':<12} {'rule':<20}{'base ms':>9}{'new ms':>9}{'new/base':>9}  finite (base, new)")
    for key in new_runs[0]:
        d, case, name = key.split("|")
        b = min(r[key][0] for r in base_runs) if key in base_runs[0] else float("nan")
        n = min(r[key][0] for r in new_runs)
        finite = (base_runs[0].get(key, [0, None])[1], new_runs[0][key][1])
        print(f"{int(d):>9,}  {case:<12} {name:<20}{b * 1e3:>9.2f}{n * 1e3:>9.2f}{n / b:>9.2f}  {finite}")


if __name__ == "__main__":
    main()
