"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only` (not part of the default test run).

Run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` and compare runs with --benchmark-save /
--benchmark-compare; groups put a backend's step next to its GEMM floor and its peers.
"""

import numpy as np
import pytest

import fastbp as fb
from fastbp.bench import CONFIGS

BACKENDS = [b for b in fb.available_backends() if b != "cupy"]
CPU_CONFIGS = [name for name, cfg in CONFIGS.items() if not cfg.get("gpu_only") and name != "wide"]


def pytest_report_header(config):
    from fastbp.envinfo import environment, format_environment

    return format_environment(environment())


@pytest.fixture(params=CPU_CONFIGS)
def config(request):
    cfg = CONFIGS[request.param]
    return request.param, cfg["sizes"], cfg["batch"]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def batch_data(config, dtype):
    _, sizes, batch = config
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, sizes[0])).astype(dtype), rng.integers(0, sizes[-1], batch)
