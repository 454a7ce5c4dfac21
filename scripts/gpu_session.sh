#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (see README "Saliency benchmark").
# Usage on the device: bash scripts/gpu_session.sh "$OUT"
set -uo pipefail
out=${1:?output folder}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
timeout 330 python3 scripts/bench_saliency.py --device cuda --widths 1 2 4 --batches 8 --batch-size 128 \
  --repeats 5 --json "$out/bench_saliency_gpu.json" 2>&1 | grep -v -i warn | tee "$out/bench_gpu.txt"
timeout 200 python3 scripts/gpu_check.py /tmp/gpu_runs 2>&1 | grep -v "it/s" | tail -20 | tee "$out/pipeline_gpu.txt"
