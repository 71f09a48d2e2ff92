"""benchmarks/gpu_check.sh fails, with a non-zero exit, when any step fails; on a machine without a usable
GPU it fails because FASTBP_REQUIRE_GPU=1 turns the GPU tests' skips into an error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastbp as fb

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_fails_where_no_gpu_is_usable(tmp_path):
    if "cupy" in fb.available_backends():
        pytest.skip("a CUDA device is usable here: benchmarks/gpu_check.sh is the GPU check itself")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert result.returncode != 0, log[-3000:]
    assert "FASTBP_REQUIRE_GPU=1 but the cupy backend is unavailable" in log
    assert "=== gpu_check finished with status 1" in log


def test_required_gpu_turns_the_gpu_tests_skips_into_an_error():
    if "cupy" in fb.available_backends():
        pytest.skip("a CUDA device is usable here")
    env = {**os.environ, "FASTBP_REQUIRE_GPU": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                             "tests/test_cupy.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FASTBP_REQUIRE_GPU=1 but the cupy backend is unavailable" in result.stdout + result.stderr
