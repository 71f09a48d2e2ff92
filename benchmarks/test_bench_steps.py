"""Training steps per backend beside their GEMM floor, the naive NumPy step and PyTorch eager."""

import pytest
from conftest import BACKENDS

import fastbp as fb
from fastbp.backends import resolve_backend
from fastbp.bench import LR, floor_candidates, naive_candidate, torch_candidates


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_step(benchmark, config, dtype, batch_data, backend_name, opt):
    name, sizes, batch = config
    benchmark.group = f"step-{name}-{dtype}"
    bk = resolve_backend(backend_name)
    model = fb.MLP(sizes, dtype=dtype, seed=0, backend=bk)
    optimizer = fb.optim.SGD(lr=LR) if opt == "sgd" else fb.optim.Adam(lr=LR)
    trainer = fb.Trainer(model, optimizer=optimizer, batch_size=batch)
    Xd, yd = model.prepare_batch(*batch_data, "cross_entropy")
    trainer._step(Xd, yd)
    benchmark(lambda: (trainer._step(Xd, yd), bk.synchronize()))


@pytest.mark.parametrize("library", ["blas:numpy", "blas:scipy", "blas:torch", "cupy"])
def test_gemm_floor(benchmark, config, dtype, library):
    """The step's GEMMs alone through each BLAS library in the process (fastbp bench's floors)."""
    name, sizes, batch = config
    benchmark.group = f"step-{name}-{dtype}"
    floors = {c.backend: c for c in floor_candidates([resolve_backend(b) for b in BACKENDS], sizes, batch, dtype)
              if c.name == "floor:step"}
    if library not in floors:
        pytest.skip(f"{library} is not in this process")
    floors[library].fn()
    benchmark(floors[library].fn)


def test_naive_numpy(benchmark, config, dtype):
    name, sizes, batch = config
    benchmark.group = f"step-{name}-{dtype}"
    benchmark(naive_candidate(sizes, batch, dtype).fn)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_torch_eager(benchmark, config, dtype, opt):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    name, sizes, batch = config
    benchmark.group = f"step-{name}-{dtype}"
    cand = torch_candidates(sizes, batch, dtype, "cpu")[0 if opt == "sgd" else 1]
    cand.fn()
    benchmark(cand.fn)
