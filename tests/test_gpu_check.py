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
    log = (tmp_path / "gpu_check_all.log").read_text()
    assert result.returncode != 0, log[-3000:]
    assert "FASTBP_REQUIRE_GPU=1 but the cupy backend is unavailable" in log
    assert "gpu_graph_probe.py" in log and "fastbp bench" in log  # both parts ran
    assert "=== gpu_check (all) finished with status 1" in log


@pytest.mark.parametrize("part,runs,skips", [("checks", "pytest -m gpu", "fastbp bench"),
                                             ("bench", "fastbp bench", "pytest -m gpu")])
def test_gpu_check_runs_one_part_in_its_own_call(tmp_path, part, runs, skips):
    """A lent GPU allows 10 minutes a call: `checks` and `bench` split the check in two, each with its log."""
    if "cupy" in fb.available_backends():
        pytest.skip("a CUDA device is usable here: benchmarks/gpu_check.sh is the GPU check itself")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", part], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    log = (tmp_path / f"gpu_check_{part}.log").read_text()
    assert result.returncode != 0, log[-3000:]  # no GPU: the tests, or the benches, fail
    assert runs in log and skips not in log, log[-3000:]
    assert f"=== gpu_check ({part}) finished with status 1" in log


def test_gpu_check_refuses_an_unknown_part(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "benches"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
    assert result.returncode == 2
    assert "usage: bash benchmarks/gpu_check.sh [all|checks|bench]" in result.stderr


def test_required_gpu_turns_the_gpu_tests_skips_into_an_error():
    if "cupy" in fb.available_backends():
        pytest.skip("a CUDA device is usable here")
    env = {**os.environ, "FASTBP_REQUIRE_GPU": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                             "tests/test_cupy.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FASTBP_REQUIRE_GPU=1 but the cupy backend is unavailable" in result.stdout + result.stderr
