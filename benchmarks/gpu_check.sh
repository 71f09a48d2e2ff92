#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA device, from the source tree (no pip, no network), in under
# 5 minutes: the GPU's facts, the gpu-marked tests, then the GPU configs of `fastbp bench` (large
# 4096 x 4 at batch 8192 in fp32 and TF32; narrow 64 wide at batch 65536) against the cuBLAS GEMM floor
# and PyTorch CUDA eager. A log and JSON results go to $OUT when it is set, else ./gpu_results/.
# Each step has its own time limit (20 + 120 + 60 + 45 + 40 s, under 5 minutes in all); a failing step is
# logged and the script goes on, exiting non-zero at the end.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
status=0
run() {  # run a step with a time limit; remember a failure but go on to the next step
  echo "=== $* ($(date -u +%H:%M:%S))"
  timeout "$@" || { rc=$?; echo "=== exit code $rc"; status=1; }
}
{
  nvidia-smi || status=1
  run 20 "$py" -m fastbp info
  run 120 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/
  run 60 "$py" -m fastbp bench --backend cupy --config large --reps 5 --min-time 0.05 --no-ops \
      --json "$out/bench_large_fp32.json"
  run 45 "$py" -m fastbp bench --backend cupy --config large --reps 5 --min-time 0.05 --no-ops --tf32 \
      --json "$out/bench_large_tf32.json"
  run 40 "$py" -m fastbp bench --backend cupy --config narrow --reps 10 --json "$out/bench_narrow.json"
  echo "=== gpu_check finished with status $status"
} 2>&1 | tee "$out/gpu_check.log"
exit $status
