#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA device, from the source tree (no pip, no network). It prints the
# GPU's facts and the driver, CUDA and CuPy versions, runs the gpu-marked tests with FASTBP_REQUIRE_GPU=1
# (a GPU CuPy cannot use fails them instead of skipping them), compute-sanitizer's memcheck, racecheck and
# synccheck over a short training run where the tool exists, then the GPU configs of `fastbp bench`
# (large 4096 x 4 at batch 8192 in fp32, TF32, bfloat16 and float16; narrow 64 wide at batch 65536 in fp32,
# bfloat16 and float16; large bfloat16 and narrow fp32 again with cuBLASLt's epilogues; narrow fp32 and
# bfloat16 with the fused training pass) against the cuBLAS GEMM floor and PyTorch CUDA eager (under
# autocast for 16 bits), after a probe of CUDA graphs of the training step (benchmarks/gpu_graph_probe.py:
# a fit with graphs against one without).
# A log and JSON results go to $OUT when it is set, else ./gpu_results/.
# Each step has its own time limit (about 17 minutes in all at worst); a failing step is logged and the
# script goes on, then exits non-zero.
#
#   bash benchmarks/gpu_check.sh [all|checks|bench]
#
# checks: the facts, the tests, the sanitizers and the graph probe (about 8.5 minutes at worst); bench: the
# facts and the benchmarks (about 10); all (the default): both. The device tool allows 10 minutes a call, so
# a lent machine can run `checks`, then `bench`, each in its own call.
set -uo pipefail
part="${1:-all}"
case "$part" in
  all|checks|bench) ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [all|checks|bench]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTBP_REQUIRE_GPU=1
py="${PYTHON:-python3}"
# Everything goes to the log as well; the status stays in this shell (a `{ ...; } | tee` pipeline would run
# the steps in a subshell, whose status the exit below would never see).
exec > >(tee "$out/gpu_check_$part.log") 2>&1
status=0
run() {  # run a step with a time limit; remember a failure but go on to the next step
  echo "=== $* ($(date -u +%H:%M:%S))"
  timeout "$@" || { rc=$?; echo "=== exit code $rc"; status=1; }
}

run 20 nvidia-smi
run 30 "$py" -c "import cupy, numpy; rt = cupy.cuda.runtime
print('driver', rt.driverGetVersion(), 'CUDA runtime', rt.runtimeGetVersion(), 'CuPy', cupy.__version__,
      'NumPy', numpy.__version__, 'NVRTC', cupy.cuda.nvrtc.getVersion())"
run 20 "$py" -m fastbp info
if [ "$part" != bench ]; then
  run 150 "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests/
  if command -v compute-sanitizer >/dev/null; then
    train='import fastbp as fb; from fastbp import datasets
X, y = datasets.load_digits(); model = fb.MLP([64, 32, 10], seed=0, backend="cupy")
fb.Trainer(model, optimizer=fb.optim.AdamW(1e-3, weight_decay=1e-2), batch_size=64, clip_norm=1.0).fit(
    X[:512] / 16, y[:512], epochs=1, verbose=0); print("trained under the sanitizer")'
    for tool in memcheck racecheck synccheck; do
      run 40 compute-sanitizer --tool "$tool" --error-exitcode 1 "$py" -c "$train"
    done
    # the fused training pass (kernels/mlp.cu): its shared memory is written and read across barriers
    fused="${train/backend=\"cupy\")/backend=\"cupy\"); model.backend.set_fused_mlp(True)}"
    run 40 compute-sanitizer --tool racecheck --error-exitcode 1 "$py" -c "$fused"
  else
    echo "=== compute-sanitizer is not on the PATH: memcheck, racecheck and synccheck not run"
  fi
  # fit with cuda_graphs=True against eager fit (fastbp's own cuBLAS handle, per-step arguments on the device):
  # the same parameters? the time per step at the small config (launch-bound) and at narrow
  run 60 "$py" benchmarks/gpu_graph_probe.py --config small --epochs 3 --json "$out/graph_probe_small.json"
  run 60 "$py" benchmarks/gpu_graph_probe.py --config narrow --epochs 2 --json "$out/graph_probe_narrow.json"
fi
if [ "$part" != checks ]; then
  run 60 "$py" -m fastbp bench --backend cupy --config large --reps 5 --min-time 0.05 --no-ops \
      --json "$out/bench_large_fp32.json"
  run 45 "$py" -m fastbp bench --backend cupy --config large --reps 5 --min-time 0.05 --no-ops --tf32 \
      --json "$out/bench_large_tf32.json"
  run 40 "$py" -m fastbp bench --backend cupy --config narrow --reps 10 --json "$out/bench_narrow.json"
  # the small config on the GPU: launch-bound, its step against its floor (what CUDA graphs would cut)
  run 30 "$py" -m fastbp bench --backend cupy --config small --reps 10 --no-ops --json "$out/bench_small.json"
  # mixed precision: float32 master weights computing in bfloat16, against the bfloat16 cuBLAS floor and
  # PyTorch eager under autocast
  run 45 "$py" -m fastbp bench --backend cupy --config large --dtype bfloat16 --reps 5 --min-time 0.05 --no-ops \
      --json "$out/bench_large_bf16.json"
  run 40 "$py" -m fastbp bench --backend cupy --config narrow --dtype bfloat16 --reps 10 --no-ops \
      --json "$out/bench_narrow_bf16.json"
  # float16 with dynamic loss scaling, against PyTorch under autocast with its GradScaler
  run 45 "$py" -m fastbp bench --backend cupy --config large --dtype float16 --reps 5 --min-time 0.05 --no-ops \
      --json "$out/bench_large_fp16.json"
  run 40 "$py" -m fastbp bench --backend cupy --config narrow --dtype float16 --reps 10 --no-ops \
      --json "$out/bench_narrow_fp16.json"
  # the work around the GEMMs fused into them by cuBLASLt's epilogues, against the same floors
  run 40 "$py" -m fastbp bench --backend cupy --config large --dtype bfloat16 --reps 5 --min-time 0.05 --no-ops \
      --epilogues cublaslt --json "$out/bench_large_bf16_cublaslt.json"
  run 30 "$py" -m fastbp bench --backend cupy --config narrow --reps 10 --no-ops --epilogues cublaslt \
      --json "$out/bench_narrow_cublaslt.json"
  # the fused training pass (forward, loss and backward in one kernel: set_fused_mlp) at narrow
  run 35 "$py" -m fastbp bench --backend cupy --config narrow --dtype float32 --dtype bfloat16 --reps 10 --no-ops \
      --fused-mlp --json "$out/bench_narrow_fused.json"
  # where the time around the GEMMs goes: each op's kernels alone, their bytes and bandwidth
  run 45 "$py" benchmarks/gpu_kernels.py --config large --compute-dtype bfloat16 --json "$out/kernels_large_bf16.json"
  run 30 "$py" benchmarks/gpu_kernels.py --config narrow --json "$out/kernels_narrow_fp32.json"
fi
echo "=== gpu_check ($part) finished with status $status"
exit $status
