"""The device-compile gate: every kernel instantiation compiled by NVRTC with the options CuPy's RawModule
uses, for sm_80 and sm_90, failing on a register spill, static shared memory over 48 KiB, or more
registers x threads per block than an SM holds. Prints the per-kernel register table.

NVRTC comes from the nvidia-cuda-nvrtc wheel (the test extra); skipped without it, except where
FASTBP_REQUIRE_NVCC=1 (CI), where that fails."""

import os

import pytest

from fastbp.backends import cuda_sources
from fastbp.testing import nvrtc


def _nvrtc_or_skip():
    try:
        return nvrtc.library()
    except nvrtc.NvrtcUnavailable as exc:
        if os.environ.get("FASTBP_REQUIRE_NVCC") == "1":
            pytest.fail(f"FASTBP_REQUIRE_NVCC=1 but {exc}")
        pytest.skip(str(exc))


@pytest.mark.parametrize("arch", nvrtc.ARCHES)
def test_every_kernel_builds_for_the_gpu_without_spills_or_oversized_blocks(arch, capsys):
    _nvrtc_or_skip()
    resources, problems = nvrtc.check_all([arch])
    listed = {n for f in cuda_sources.FILES for n in cuda_sources.name_expressions(f)}
    assert {k.name for k in resources} == listed  # ptxas reported on every instantiation
    with capsys.disabled():
        print(f"\nNVRTC {'.'.join(map(str, nvrtc.version()))}, {arch}: registers per kernel\n{nvrtc.table(resources)}")
    assert not problems, "\n".join(problems)


def test_the_gate_sees_spills_and_oversized_launches():
    _nvrtc_or_skip()
    source = r"""
    __global__ void __launch_bounds__(1024, 2) hungry(const float* x, float* y) {
        float r[48];
        #pragma unroll
        for (int i = 0; i < 48; ++i) r[i] = x[threadIdx.x + i * 1024];
        float s = 0.0f;
        #pragma unroll
        for (int i = 0; i < 48; ++i) s += r[i] * r[47 - i] + r[(i * 7) % 48] / (1.0f + r[(i * 5) % 48]);
        y[threadIdx.x] = s;
    }
    __global__ void plain(float* y) { y[threadIdx.x] = 1.0f; }
    """
    found = {k.name: k for k in nvrtc.compile_source(source, "gate.cu", ["hungry", "plain"], [], "sm_90")}
    hungry, plain = found["hungry"], found["plain"]
    assert hungry.registers <= 32  # the launch bounds cap it at 65536 / (1024 * 2)
    assert hungry.spill_stores > 0 and "spills registers" in nvrtc.problems(hungry, 1024)[0]
    assert nvrtc.problems(plain, 1024) == []
    greedy = nvrtc.KernelResources("greedy", "sm_90", registers=72, stack_frame=0, spill_stores=0, spill_loads=0,
                                   shared=49 * 1024, barriers=1)
    assert [p.split(" ")[0] for p in nvrtc.problems(greedy, 1024)] == ["uses", "72"]


def test_compile_errors_come_back_with_the_log():
    _nvrtc_or_skip()
    with pytest.raises(nvrtc.NvrtcError, match="undefined_name"):
        nvrtc.compile_source("__global__ void k(float* y) { y[0] = undefined_name; }", "bad.cu", ["k"], [], "sm_90")
