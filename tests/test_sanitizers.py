"""The emulated kernel tests once more under AddressSanitizer and UBSan: the kernel libraries are built with
-fsanitize=address,undefined and run in a child Python with libasan preloaded, so an out-of-bounds access
to global or __shared__ memory (each shared array is its own allocation) or undefined behaviour aborts the
run with a report. The same run by hand:

    eval "$(python -m fastbp.testing.cuda_emulator --sanitizer-env)"
    python -m pytest tests/test_emulated_kernels.py tests/test_cuda_emulator.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EMULATOR_MISSING

from fastbp.testing import cuda_emulator

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.skipif(
    bool(EMULATOR_MISSING), reason=f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")]

ROOT = Path(__file__).resolve().parent.parent

# A kernel whose thread 31 writes one element past a 32-float shared array; WRITE is the faulty store.
OVERFLOW_KERNEL = """__global__ void k(float* out) {
    __shared__ float s[32];
    WRITE = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}"""
LAUNCH = """
import sys
import numpy as np
from fastbp.testing import cuda_emulator as emu
module = emu.compile_module(sys.argv[1], ["k"], "overflow.cu")
module.get_function("k").launch(1, 32, (np.zeros(32, np.float32),))
print("no error reported")
"""


def _run_sanitized(args, timeout):
    try:
        sanitizer = cuda_emulator.sanitizer_env()
    except cuda_emulator.EmulatorUnavailable as exc:
        if os.environ.get("FASTBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(f"FASTBP_REQUIRE_EMULATOR=1 but {exc}")
        pytest.skip(str(exc))
    env = {**os.environ, **sanitizer, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("write,report", [
    ("s[threadIdx.x + 1]", "index 32 out of bounds for type 'float [32]'"),  # UBSan: the array's type is known
    ("(&s[0] + 1)[threadIdx.x]", "heap-buffer-overflow"),  # through a pointer: ASan's redzone
])
def test_the_sanitizers_catch_a_shared_memory_overflow(write, report):
    result = _run_sanitized(["-c", LAUNCH, OVERFLOW_KERNEL.replace("WRITE", write)], timeout=300)
    assert result.returncode != 0, result.stdout
    assert report in result.stderr and "overflow.cu:3" in result.stderr, result.stderr[-3000:]


def test_the_kernel_tests_pass_under_the_sanitizers():
    # --capture=sys: a sanitizer writes its report to file descriptor 2, which must reach us
    result = _run_sanitized(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
                             "tests/test_emulated_kernels.py", "tests/test_cuda_emulator.py"], timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
