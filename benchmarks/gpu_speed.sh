#!/usr/bin/env bash
# The GPU figures of reports/speed in one call on a lent GPU machine (its own python3 with torch; the step
# benchmark needs neither Ray, MLflow nor data files). Results go to $OUT (default benchmarks/results).
#   bash benchmarks/gpu_speed.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# 1. the cached step, eager and with CUDA graphs (torch.compile reduce-overhead), fp32 and bf16 autocast
timeout 330 "$PY" benchmarks/step_speed.py --device cuda --rounds 2 --iters 50 --warmup 5 \
    --modes fp32 bf16 compile-graphs compile-graphs+bf16 --out "$OUT/step_speed_gpu.csv"
# 2. the paper's Table 7 on this GPU (writes table7.csv beside the --out file)
timeout 150 "$PY" benchmarks/step_speed.py --device cuda --table7 --rounds 1 --iters 30 --out "$OUT/gpu/x.csv"
# 3. where bf16 starts to pay: batch 256
timeout 90 "$PY" benchmarks/step_speed.py --device cuda --batch 256 --rounds 1 --iters 20 --modes fp32 bf16 \
    --out "$OUT/step_speed_gpu_b256.csv"
} 2>&1 | tee "$OUT/gpu_speed.log"
