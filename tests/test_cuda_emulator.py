"""The CUDA emulator itself: the CUDA semantics it reproduces and the bugs it must catch, each shown on a
small kernel written for the purpose (fastbp's own kernels are tested in test_emulated_kernels.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import EMULATOR_MISSING

from fastbp.testing import cuda_emulator
from fastbp.testing.cuda_emulator import EmulatorError

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(
    bool(EMULATOR_MISSING), reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")]

SOURCE = r"""
// block sum with a barrier after each step
__global__ void block_sum(const float* x, float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// the same without the barrier after the store: a race
__global__ void racy_sum(const float* x, float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = x[threadIdx.x];
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = s[0];
}

__global__ void early_return(float* out, int n) {
    if (threadIdx.x >= n) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void divergent_shuffle(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 2 == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

__global__ void shuffles(const int* x, int* out, int width) {
    const int lane = threadIdx.x;
    const int v = x[lane];
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, 3, width);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 2, width);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 2, width);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 5, width);
    out[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, v % 3 == 0));
    out[5 * 32 + lane] = __all_sync(0xffffffffu, v >= 0);
    out[6 * 32 + lane] = __any_sync(0xffffffffu, v == 7);
    out[7 * 32 + lane] = __syncthreads_count(v % 2);
}

__global__ void half_warp_shuffle(const double* x, double* out, int width) {
    double v = x[threadIdx.x];
    if (threadIdx.x < 16) v += __shfl_down_sync(0x0000ffffu, v, 8, width);  // the mask names the lanes taking part
    out[threadIdx.x] = v;
}

__global__ void uninitialised(float* out) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

__global__ void too_much_shared(float* out) {
    __shared__ double big[7000];
    big[threadIdx.x] = 1.0;
    out[0] = big[0];
}

__global__ void atomic_count(unsigned long long* counter) {
    atomicAdd(counter, 1ull);
}

__global__ void typed(float* out, const long long* labels, float scale, long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) out[i] = scale * labels[i];
}

__global__ void off_by_one(float* out, int n) {
    if (threadIdx.x < n) out[threadIdx.x + 1] = 1.0f;
}

__global__ void shared_overflow(float* out) {
    __shared__ float s[32];
    s[threadIdx.x + 1] = 1.0f;  // thread 31 writes s[32]
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

__global__ void dynamic(float* out) {
    extern __shared__ float buffer[];
    buffer[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = buffer[blockDim.x - 1 - threadIdx.x];
}
"""

NAMES = ["block_sum", "racy_sum", "early_return", "divergent_shuffle", "shuffles", "half_warp_shuffle",
         "uninitialised", "too_much_shared", "atomic_count", "typed", "off_by_one", "shared_overflow", "dynamic"]


@pytest.fixture(scope="module")
def kernels():
    module = cuda_emulator.compile_module(SOURCE, NAMES, "emulator_rules.cu")
    return {name: module.get_function(name) for name in NAMES}


def test_the_portable_stack_switch_runs_the_same_rules():
    """CPUs other than x86-64 switch fibers with ucontext; -DFBEMU_UCONTEXT selects that path here."""
    module = cuda_emulator.compile_module(SOURCE, NAMES, "emulator_rules.cu", extra_options=["-DFBEMU_UCONTEXT"])
    x = np.arange(2 * 256, dtype=np.float32)
    for order in ("forward", "random"):
        out = np.full(2, np.nan, np.float32)
        module.get_function("block_sum").launch(2, 256, (x, out), order=order, seed=2)
        np.testing.assert_array_equal(out, x.reshape(2, 256).sum(1))
    ints = np.arange(32, dtype=np.int32)
    out = np.zeros(8 * 32, np.int32)
    module.get_function("shuffles").launch(1, 32, (ints, out, np.int32(32)))
    np.testing.assert_array_equal(out[3 * 32:4 * 32], np.arange(32) ^ 5)  # __shfl_xor_sync
    with pytest.raises(EmulatorError, match="which has exited"):
        module.get_function("early_return").launch(1, 64, (np.zeros(64, np.float32), np.int32(40)))


def test_block_reduction_is_exact_in_every_order(kernels):
    x = np.arange(4 * 256, dtype=np.float32)
    for order in ("forward", "reverse", "random"):
        out = np.full(4, np.nan, np.float32)
        kernels["block_sum"].launch(4, 256, (x, out), order=order, seed=1)
        np.testing.assert_array_equal(out, x.reshape(4, 256).sum(1))


def test_a_missing_barrier_changes_the_result_with_the_thread_order(kernels):
    x = np.ones(256, np.float32)
    results = {}
    for order in ("forward", "reverse"):
        out = np.zeros(1, np.float32)
        kernels["racy_sum"].launch(1, 256, (x, out), order=order)
        results[order] = out[0]
    assert results["reverse"] == 256  # thread 0 runs last: every store is done before it reads
    assert np.isnan(results["forward"])  # thread 0 runs first and reads shared memory nobody wrote yet


def test_a_barrier_after_an_early_return_is_an_error_naming_the_line(kernels):
    kernels["early_return"].launch(1, 64, (np.zeros(64, np.float32), np.int32(64)))  # nobody returns early: fine
    with pytest.raises(EmulatorError, match=r"emulator_rules.cu:\d+: .*__syncthreads waits for .* which has exited"):
        kernels["early_return"].launch(1, 64, (np.zeros(64, np.float32), np.int32(40)))


def test_a_full_mask_shuffle_in_divergent_code_is_an_error(kernels):
    with pytest.raises(EmulatorError, match="__shfl_xor_sync with mask 0xffffffff cannot complete"):
        kernels["divergent_shuffle"].launch(1, 32, (np.zeros(32, np.float32),))


def test_shuffle_vote_and_counting_barrier_semantics(kernels):
    x = np.array([7, 3, 12, 5, 0, 9, 14, 1, 6, 2, 11, 8, 15, 4, 13, 10] * 2, np.int32)
    lane = np.arange(32)
    for width in (32, 16, 8):
        out = np.full(8 * 32, -99, np.int32)
        kernels["shuffles"].launch(1, 32, (x, out, np.int32(width)))
        seg = lane & ~(width - 1)
        r = out.reshape(8, 32)
        np.testing.assert_array_equal(r[0], x[seg + 3 % width])
        up = lane - 2
        np.testing.assert_array_equal(r[1], np.where(up >= seg, x[np.maximum(up, 0)], x))
        down = lane + 2
        np.testing.assert_array_equal(r[2], np.where(down < seg + width, x[np.minimum(down, 31)], x))
        xor = lane ^ 5
        np.testing.assert_array_equal(r[3], np.where(xor < seg + width, x[xor % 32], x))
        ballot = int(sum(1 << i for i in range(32) if x[i] % 3 == 0))
        np.testing.assert_array_equal(r[4].view(np.uint32), np.full(32, ballot, np.uint32))
        np.testing.assert_array_equal(r[5], np.ones(32))
        np.testing.assert_array_equal(r[6], np.ones(32))
        np.testing.assert_array_equal(r[7], np.full(32, int((x % 2).sum())))


def test_a_partial_mask_shuffle_works_when_it_reads_only_lanes_of_its_mask(kernels):
    x = np.arange(32, dtype=np.float64)
    out = np.zeros(32)
    kernels["half_warp_shuffle"].launch(1, 32, (x, out, np.int32(16)), order="random", seed=3)
    want = x.copy()
    k = np.arange(16)
    want[:16] += np.where(k + 8 < 16, x[np.minimum(k + 8, 31)], x[:16])  # width 16: no lane reads past 15
    np.testing.assert_array_equal(out, want)
    # with the full width, lanes 8-15 would read lanes 16-23, which the mask leaves out: undefined on a GPU
    with pytest.raises(EmulatorError, match="reads lane 16, which its mask does not name"):
        kernels["half_warp_shuffle"].launch(1, 32, (x, out, np.int32(32)))


def test_shared_memory_starts_as_nan_in_every_block(kernels):
    out = np.zeros(2 * 64, np.float32)
    kernels["uninitialised"].launch(1, 64, (out[:64],))
    assert (out[:32] == 1).all() and np.isnan(out[32:64]).all()


def test_static_shared_memory_over_48_kib_is_refused(kernels):
    with pytest.raises(EmulatorError, match="over 48 KiB"):
        kernels["too_much_shared"].launch(1, 32, (np.zeros(1, np.float32),))


def test_atomics_see_every_thread_of_every_block(kernels):
    counter = np.zeros(1, np.uint64)
    kernels["atomic_count"].launch((3, 2), (64, 2), (counter,), order="random", seed=5)
    assert counter[0] == 3 * 2 * 64 * 2


def test_arguments_are_read_as_cupy_passes_them_and_checked_against_the_parameter_types(kernels):
    k = kernels["typed"]
    out = np.zeros(5, np.float32)
    labels = np.arange(5, dtype=np.int64)
    k.launch(1, 32, (out, labels, np.float32(0.5), 5))  # a Python int is a long long, as in CuPy
    np.testing.assert_array_equal(out, 0.5 * np.arange(5))
    with pytest.raises(TypeError, match=r"argument 2 \(float\): got a Python float \(CuPy passes it as double\)"):
        k.launch(1, 32, (out, labels, 0.5, 5))
    with pytest.raises(TypeError, match=r"argument 1 \(const long long\*\): got a int32 array"):
        k.launch(1, 32, (out, labels.astype(np.int32), np.float32(0.5), 5))
    with pytest.raises(TypeError, match="non-contiguous"):
        k.launch(1, 32, (np.zeros(10, np.float32)[::2], labels, np.float32(0.5), 5))
    with pytest.raises(TypeError, match=r"argument 3 \(long long\): got a int32 value"):
        k.launch(1, 32, (out, labels, np.float32(0.5), np.int32(5)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        k.launch(1, 32, (out, labels))


def test_writes_out_of_bounds_of_guarded_memory_are_errors(kernels):
    out = cuda_emulator.guarded_empty(8, np.float32)
    with pytest.raises(EmulatorError, match="off_by_one: argument 0: written out of bounds, past its end"):
        kernels["off_by_one"].launch(1, 32, (out, np.int32(8)))
    kernels["off_by_one"].launch(1, 32, (out, np.int32(7)))  # in bounds: fine, and the margins were re-armed
    assert np.isnan(out[0]) and (out[1:] == 1).all()


@pytest.mark.skipif(os.environ.get("FASTBP_EMULATOR_SANITIZE") == "1",
                    reason="under ASan the overflow aborts the run: tests/test_sanitizers.py shows that case")
def test_writes_out_of_bounds_of_shared_memory_are_errors(kernels):
    message = r"emulator_rules.cu:\d+: __shared__ s \(128 bytes\) was written out of bounds"
    with pytest.raises(EmulatorError, match=message):
        kernels["shared_overflow"].launch(1, 32, (np.zeros(32, np.float32),))


def test_dynamic_shared_memory(kernels):
    out = np.zeros(64, np.float32)
    kernels["dynamic"].launch(1, 64, (out,), shared_mem=64 * 4, order="reverse")
    np.testing.assert_array_equal(out, np.arange(64)[::-1])
    with pytest.raises(EmulatorError, match="shared_mem=0"):
        kernels["dynamic"].launch(1, 64, (out,))


def test_launch_shapes_beyond_cuda_limits_are_refused(kernels):
    with pytest.raises(EmulatorError, match="exceeds the CUDA limits"):
        kernels["atomic_count"].launch(1, (1024, 2), (np.zeros(1, np.uint64),))


def test_compile_errors_name_the_source():
    with pytest.raises(cuda_emulator.EmulatorCompileError, match="broken.cu"):
        cuda_emulator.compile_module("__global__ void k(float* x) { x[0] = undefined_name; }", ["k"], "broken.cu")


def test_libraries_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBP_CACHE_DIR", str(tmp_path))
    source = "__global__ void k(float* x) { x[threadIdx.x] = 2.0f; }"
    first = cuda_emulator.build(source, ["k"], "cached.cu")
    assert first.parent == tmp_path / "emulator" and first.is_file()
    assert cuda_emulator.build(source, ["k"], "cached.cu") == first  # the same inputs: the same library
    assert cuda_emulator.build(source.replace("2.0f", "3.0f"), ["k"], "cached.cu") != first
