#!/usr/bin/env bash
# Table I's grid on a lent GPU machine in one call (its image has torch but no Flower, no Ray, no internet).
#
#   bash benchmarks/gpu_paper.sh DATA_DIR [RUN_CONFIG] [LIMIT_SECONDS]
#
# DATA_DIR as for gpu_session.sh: mnist/*-ubyte.gz and mnist/partitions/ (the iid split's cache).
# Runs `byzflower sweep` over the 24 runs of `make paper` (SGD, mini-batch SGD, SAGA x mean, GM x four
# attacks; 15,000 iterations, evaluations every 500) on the GPU, 12 at a time in local processes, with
# RUN_CONFIG added (default: model='mlp-notebook', the authors' network), no checkpoints (the SAGA tables
# would make the folders too large to bring back). Writes under $OUT (or ./gpu-paper): the machine and the
# sweep's log, paper.md, figure.png, mechanism.png, and runs.tar.gz (the sweep folder: its report, every
# run's summary.json, metrics.jsonl, config and final model), so the report can be redrawn elsewhere. At
# LIMIT_SECONDS (default 420) the sweep is stopped (it records its runs as interrupted) and whatever
# finished is packed all the same.
# GRID (the sweep's --optimizer/--aggregator/--attack flags) and JOBS replace the grid and the runs at once;
# BRING (default "paper.md figure.png mechanism.png") names the report files copied beside the archive
# (at most 8 files come back from a call: BRING="" when two sweeps share one).
set -u
data=${1:?"usage: bash benchmarks/gpu_paper.sh DATA_DIR [RUN_CONFIG] [LIMIT_SECONDS]"}
extra=${2:-"model='mlp-notebook'"}
limit=${3:-420}
out=${OUT:-gpu-paper}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "$0")/gpu_data.sh"
gpu_data "$data" || exit 1
sweep=$(mktemp -d)/sweep
trap 'rm -rf "$BYZFLOWER_DATA_DIR" "$(dirname "$sweep")"' EXIT
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$out/machine.txt"
$py -c 'import torch; print("torch", torch.__version__)' 2>&1 | tee -a "$out/machine.txt"
echo "start $(date -u +%FT%TZ)" | tee -a "$out/machine.txt"
start=$(date +%s)
# SIGTERM at the limit: the sweep records its runs as interrupted and ends (its --stop-grace after).
grid=${GRID:-"--optimizer sgd,batch-sgd,saga --aggregator mean,gm --attack none,gaussian,sign-flip,zero-gradient"}
# shellcheck disable=SC2086
timeout --kill-after=60 "$limit" "$py" -m byzflower.cli sweep $grid \
  --run-config "num-server-rounds=15000 eval-every=500 checkpoint-every=0 device='cuda' $extra" \
  --jobs "${JOBS:-12}" --backend processes --stop-grace 20 --out "$sweep" 2>&1 |
  grep -v -e '^USDT:' -e 'DeviceProperties.cpp' | tee "$out/sweep.log"
echo "sweep exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s" | tee -a "$out/machine.txt"
for f in ${BRING-paper.md figure.png mechanism.png}; do
  [ -f "$sweep/$f" ] && cp "$sweep/$f" "$out/"
done
# The whole sweep folder but checkpoints and the per-run plots (at most 8 files come back).
tar czf "$out/runs.tar.gz" -C "$sweep" --exclude='checkpoint*' --exclude='*/*.png' .
ls -la "$out"
