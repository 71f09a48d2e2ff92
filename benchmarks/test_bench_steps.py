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


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gemm_floor(benchmark, config, dtype, backend_name):
    name, sizes, batch = config
    benchmark.group = f"step-{name}-{dtype}"
    floor = floor_candidates(resolve_backend(backend_name), sizes, batch, dtype)[0]
    floor.fn()
    benchmark(floor.fn)


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
