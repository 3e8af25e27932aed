#!/usr/bin/env bash
# A lent GPU machine's checks in one call (its image has torch but no Flower, no Ray, no internet).
#
#   bash benchmarks/gpu_session.sh DATA_DIR [SETUPS]
#
# DATA_DIR holds mnist/*-ubyte.gz (the four MNIST files, gzipped to travel) and mnist/partitions/ (the
# iid split's cache: the machine has no flwr-datasets); they are unpacked into a scratch data folder. Prints, and writes under $OUT (or ./gpu-session):
#   1. the machine (GPU, driver, torch);
#   2. conv nets' worker gradients on the GPU, per-sample rows against one gradient per worker
#      (benchmarks/group_gradients.py --device cuda --resnet);
#   3. the local engine's steady-state iteration on CPU and GPU for every setup of benchmarks/gpu.py,
#      with the CPU/GPU equality check (conv nets included: whether their steps replay from CUDA graphs);
#   4. two whole 15,000-iteration runs on the GPU (SGD + mean, SAGA + GM under zero-gradient).
# SETUPS (comma-separated names of benchmarks/gpu.py) limits step 3 to those and skips step 4.
# Step 3's check is read against its CPU-alone yardsticks, made beforehand on any machine:
#   python benchmarks/gpu.py --devices cpu --iterations 0 --cpu-spread 20
# (open since 2026-11-27: SAGA + GM on the cnn ends 2.6e-3 from the CPU where both yardsticks stay
# under 3e-6; the check's "@t" figures show at which iteration the gap opens).
# Each step has its own time limit, so one that hangs does not take the others' results with it.
set -u
data=${1:?"usage: bash benchmarks/gpu_session.sh DATA_DIR (holding mnist/*-ubyte.gz)"}
out=${OUT:-gpu-session}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
. "$(dirname "$0")/gpu_data.sh"
gpu_data "$data" || exit 1
trap 'rm -rf "$BYZFLOWER_DATA_DIR"' EXIT
py=${PYTHON:-python3}

step() {  # step NAME LIMIT_SECONDS COMMAND...: output to the screen and to $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" 2>&1 | grep -v -e '^USDT:' -e 'DeviceProperties.cpp' | tee "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

step machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; \
  nproc; $py -c 'import torch, numpy, threadpoolctl; print(\"torch\", torch.__version__, \"numpy\", numpy.__version__)'"
step group_gradients 120 "$py" benchmarks/group_gradients.py --device cuda --resnet
setups=${2:-}
step iteration 270 "$py" benchmarks/gpu.py --devices cpu,cuda --iterations 100 --profile 15 --check 20 \
  --json "$out/iteration.json" ${setups:+--setups "$setups"}
[ -n "$setups" ] && exit 0
step whole_runs 120 "$py" benchmarks/gpu.py --devices cuda --setups sgd-mean,saga-gm-zero --iterations 20 \
  --profile 5 --full 15000
