#!/usr/bin/env bash
# The GPU figures of reports/speed in one call on a lent GPU machine (its own python3 with torch; the step
# benchmark needs neither Ray, MLflow nor data files). Results go to $OUT (default benchmarks/results).
#   bash benchmarks/gpu_speed.sh [OLD_LIBRARY_DIR]   # a directory holding an older timevlm/ to compare with
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# 1. the cached step in fp32 eager, against an older library when one is given
timeout 120 "$PY" benchmarks/step_speed.py --device cuda --rounds 3 --iters 50 --warmup 5 --modes fp32 \
    ${1:+--against "$1"} --out "$OUT/step_speed_gpu.csv"
# 2. bf16 autocast and CUDA graphs (torch.compile reduce-overhead): per-step time and what compiling costs
timeout 180 "$PY" benchmarks/step_speed.py --device cuda --rounds 1 --iters 50 --warmup 5 \
    --modes bf16 compile-graphs compile-graphs+bf16 --out "$OUT/step_speed_gpu_modes.csv"
# 3. the paper's Table 7 on this GPU (writes table7.csv beside the --out file)
timeout 100 "$PY" benchmarks/step_speed.py --device cuda --table7 --rounds 1 --iters 30 --out "$OUT/gpu/x.csv"
} 2>&1 | tee "$OUT/gpu_speed.log"
