#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (see README "Saliency benchmark" and "GPU").
# Usage on the device: bash scripts/gpu_session.sh "$OUT"   (about 8 minutes on an H100: give it 10)
# Every step has its own time limit and writes as it goes, so a step that fails or runs out of
# time leaves the others' results; everything printed also goes to "$out/log.txt".
set -uo pipefail
out=${1:?output folder}
log="$out/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() { echo "### $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"; }
step nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
# 1. exactness on the GPU: stacked whole / half and SOSP-I's row sums against forward mode (float64)
step timeout 60 python3 scripts/gpu_exactness.py --device cuda --json "$out/exactness_gpu.json"
# 2. the saliency benchmark as in the earlier H200 table (8 batches of 128), stacked and forward mode,
#    float32 products in IEEE float32 (saliency.tf32=false, the default)
step timeout 200 python3 scripts/bench_saliency.py --device cuda --widths 1 2 4 --batches 8 --batch-size 128 \
  --repeats 5 --methods gradient taylor sosp_h sosp_h_half sosp_h_pair sosp_i sosp_h_fwad --json "$out/bench_saliency_gpu.json"
# 3. larger batches (2 of 512): less launch-bound
step timeout 100 python3 scripts/bench_saliency.py --device cuda --widths 1 2 4 --batches 2 --batch-size 512 \
  --repeats 5 --methods gradient taylor sosp_h sosp_h_half sosp_h_pair sosp_i --json "$out/bench_saliency_gpu_b512.json"
# 3b. x4 at batch 512 with cuDNN autotuning (as sosp-run): is `whole` still slower than `half` there?
step timeout 60 python3 scripts/bench_saliency.py --device cuda --widths 4 --batches 2 --batch-size 512 \
  --repeats 5 --methods taylor sosp_h sosp_h_half sosp_h_pair --cudnn-benchmark --no-memory --json "$out/bench_saliency_gpu_b512_autotune.json"
# 3c. SOSP-I against SOSP-H as the number of classes grows (README: "SOSP-I grows with the number of classes")
step timeout 60 python3 scripts/bench_saliency.py --device cuda --widths 1 --classes 10 100 --batches 2 --batch-size 128 \
  --repeats 3 --methods taylor sosp_h sosp_i --no-memory --json "$out/bench_saliency_gpu_classes.json"
# 4. the whole pipeline on CUDA with AMP and channels_last (sosp_h and sosp_i)
step timeout 120 python3 scripts/gpu_check.py /tmp/gpu_runs
