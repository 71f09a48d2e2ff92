"""Property tests: ops on random shapes, dtypes, activations and losses equal the NumPy reference on
every backend; malformed files give only the documented errors (ValueError), never a crash or a hang."""

import gzip
import io
import json
import zipfile

import numpy as np
import pytest
from conftest import BACKENDS

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed: the property tests are skipped")
from hypothesis import HealthCheck, given, settings  # noqa: E402, I001
from hypothesis import strategies as st  # noqa: E402

import fastbp as fb  # noqa: E402
from fastbp import datasets  # noqa: E402
from fastbp.activations import ACTIVATIONS  # noqa: E402
from fastbp.backends import resolve_backend  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy"]


@st.composite
def problems(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    batch = draw(st.integers(1, 12))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    loss = draw(st.sampled_from(LOSSES))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    seed = draw(st.integers(0, 2**16))
    return sizes, batch, act, loss, dtype, seed


@SETTINGS
@given(problems())
def test_loss_and_grads_equal_the_numpy_reference(problem):
    sizes, batch, act, loss, dtype, seed = problem
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, sizes[0]))
    if loss == "cross_entropy":
        y = rng.integers(0, sizes[-1], batch)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, (batch, sizes[-1])).astype(float)
    else:
        y = rng.standard_normal((batch, sizes[-1]))
    ref_model = fb.MLP(sizes, activation=act, dtype=dtype, seed=seed, backend="numpy")
    ref_loss, ref_grads = ref_model.loss_and_grads(X, y, loss)
    tol = {"rtol": 2e-4, "atol": 2e-5} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-12}
    for name in BACKENDS:
        bk = resolve_backend(name)
        model = fb.MLP(sizes, activation=act, dtype=dtype, seed=seed, backend=bk)
        value, grads = model.loss_and_grads(X, y, loss)
        np.testing.assert_allclose(value, ref_loss, **tol)
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and g.dtype == r.dtype
            np.testing.assert_allclose(bk.to_numpy(g), r, **tol)


@SETTINGS
@given(st.sampled_from(["X", "y"]), st.sampled_from(["nan", "inf", "complex", "object", "string", "3d", "empty"]))
def test_bad_inputs_raise_documented_errors(which, kind):
    model = fb.MLP([3, 4, 2], seed=0)
    X, y = np.ones((4, 3)), np.array([0, 1, 0, 1])
    bad = {"nan": np.full((4, 3), np.nan), "inf": np.full((4, 3), np.inf), "complex": np.ones((4, 3), complex),
           "object": np.array([[None] * 3] * 4, dtype=object), "string": np.array([["a"] * 3] * 4),
           "3d": np.ones((4, 3, 1)), "empty": np.ones((0, 3))}[kind]
    if which == "y":
        X, y = X, (bad[:, 0] if bad.ndim > 1 and kind != "3d" else bad)
    else:
        X = bad
    before = model.get_weights()
    with pytest.raises((ValueError, TypeError)):
        model.loss_and_grads(X, y, "cross_entropy")
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def _assert_only_value_error(loader, path):
    try:
        loader(path)
    except ValueError:
        pass  # the documented error; anything else fails the test


def _idx_bytes(rng):
    arr = rng.integers(0, 255, (3, 2, 2)).astype(np.uint8)
    return bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape) + arr.tobytes()


def _mutations(data, rng):
    """Truncations, byte flips and junk appended to a valid file's bytes."""
    yield data[: int(rng.integers(0, len(data)))]
    flipped = bytearray(data)
    for i in rng.integers(0, len(data), size=4):
        flipped[i] ^= int(rng.integers(1, 256))
    yield bytes(flipped)
    yield data + bytes(rng.integers(0, 256, 16, dtype=np.uint8))


@SETTINGS
@given(st.integers(0, 2**32 - 1))
def test_malformed_files_give_value_errors(tmp_path_factory, seed):
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("fuzz")
    # valid originals of every format
    buf = io.BytesIO()
    np.savez(buf, X=rng.standard_normal((3, 2)), y=np.array([0, 1, 0]))
    npz = buf.getvalue()
    csv = b"a,b,label\n1,2,0\n3,4,1\n"
    model_path = fb.MLP([2, 3, 2], seed=seed).save(tmp / "m.npz") or (tmp / "m.npz")
    trainer = fb.Trainer(fb.MLP([2, 3, 2], seed=seed), batch_size=2)
    trainer.fit(np.ones((4, 2)), np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    ckpt = trainer.save_checkpoint(tmp / "c.npz").read_bytes()
    originals = {
        "data.npz": (npz, datasets.load_npz),
        "data.csv": (csv, lambda p: datasets.load_csv(p, label_column="label")),
        "data.csv.gz": (gzip.compress(csv), datasets.load_csv),
        "img.idx": (_idx_bytes(rng), datasets.read_idx),
        "img.idx.gz": (gzip.compress(_idx_bytes(rng)), datasets.read_idx),
        "model.npz": (model_path.read_bytes(), fb.load),
        "ckpt.npz": (ckpt, fb.Trainer.load_checkpoint),
    }
    for name, (data, loader) in originals.items():
        for i, mutated in enumerate(_mutations(data, rng)):
            path = tmp / f"{i}-{name}"
            path.write_bytes(mutated)
            _assert_only_value_error(loader, path)


def test_npz_with_pickled_or_wrong_metadata(tmp_path):
    path = tmp_path / "meta.npz"
    with zipfile.ZipFile(path, "w") as z:
        with z.open("__meta__.npy", "w") as f:
            np.lib.format.write_array(f, np.frombuffer(json.dumps([1, 2]).encode(), np.uint8))
    with pytest.raises(ValueError, match="corrupt metadata"):
        fb.load(path)
