"""The step's ops one by one, per backend: forward, output delta, backprop, optimizer updates."""

import pytest
from conftest import BACKENDS

import fastbp as fb
from fastbp.backends import resolve_backend
from fastbp.bench import _op_candidates

OPS = ["op:dense_forward", "op:output_delta", "op:backprop_dense", "op:update_sgd", "op:update_adam"]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, config, dtype, batch_data, backend_name, op):
    name, sizes, batch = config
    benchmark.group = f"{op}-{name}-{dtype}"
    bk = resolve_backend(backend_name)
    model = fb.MLP(sizes, dtype=dtype, seed=0, backend=bk)
    Xd, yd = model.prepare_batch(*batch_data, "cross_entropy")
    cand = {c.name: c for c in _op_candidates(model, bk, Xd, yd, sizes, batch)}[op]
    cand.fn()
    benchmark(cand.fn)
