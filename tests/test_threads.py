import numpy as np
import pytest

import fastbp as fb

pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")


def test_num_threads_limits_every_blas_and_restores():
    before = fb.get_num_threads()
    assert before and all(v >= 1 for v in before.values())
    with fb.num_threads(1):
        inside = fb.get_num_threads()
        assert set(inside.values()) == {1}
        # results do not depend on the thread count
        rng = np.random.default_rng(0)
        X, y = rng.standard_normal((64, 20)), rng.integers(0, 3, 64)
        one = fb.MLP([20, 32, 3], dtype="float64", seed=0).loss_and_grads(X, y)[0]
    assert fb.get_num_threads() == before
    assert one == pytest.approx(fb.MLP([20, 32, 3], dtype="float64", seed=0).loss_and_grads(X, y)[0], rel=1e-12)


def test_set_num_threads_checks_its_argument():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        fb.set_num_threads(0)
    before = fb.get_num_threads()
    try:
        fb.set_num_threads(1)
        assert set(fb.get_num_threads().values()) == {1}
    finally:
        for value in set(before.values()):
            fb.set_num_threads(value)
    assert fb.get_num_threads() == before
