import threading

import numpy as np
import pytest
from conftest import BACKENDS

import fastbp as fb
from fastbp.backends import backend_status, resolve_backend


def test_numpy_is_always_available_and_auto_picks_the_first():
    names = fb.available_backends()
    assert "numpy" in names
    assert names[-1] == "numpy"  # best first, the reference last
    assert resolve_backend("auto").name == names[0]


def test_status_explains_every_unavailable_backend():
    status = backend_status()
    assert set(status) == {"numpy", "numba", "cupy"}
    for name, why in status.items():
        if name in fb.available_backends():
            assert why == "available"
        else:
            assert why and why != "available"
            with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
                fb.set_backend(name)


def test_unknown_backend_name_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        fb.set_backend("tensorflow")
    with pytest.raises(TypeError, match="backend must be a name"):
        fb.set_backend(3)


def test_use_backend_restores_and_is_per_context():
    scoped = next(b for b in BACKENDS if b != "numpy")  # numba or the emulated CuPy: not the default
    fb.set_backend("numpy")
    seen = {}

    def other_thread():
        seen["other"] = fb.get_backend().name

    with fb.use_backend(scoped) as bk:
        assert fb.get_backend() is bk and bk.name == scoped
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert fb.get_backend().name == "numpy"
    assert seen["other"] == "numpy"  # the block chose for its own context only



def test_use_backend_restores_after_an_exception():
    before = fb.get_backend()
    with pytest.raises(RuntimeError), fb.use_backend("numpy"):
        raise RuntimeError("boom")
    assert fb.get_backend() is before


def test_backend_memory_roundtrip(backend):
    x = np.arange(6.0).reshape(2, 3)
    d = backend.asarray(x, np.float32)
    assert backend.is_array(d)
    back = backend.to_numpy(d)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, x)
    assert backend.to_float(backend.xp.sum(d)) == 15.0
    z = backend.to_numpy(backend.zeros((2, 2), np.float64))
    np.testing.assert_array_equal(z, np.zeros((2, 2)))
