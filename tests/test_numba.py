"""What is particular to the numba backend: the whole-step kernel equals the op-by-op path, results are
bit-identical from run to run, and the disk cache goes where it is told."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DTYPES, assert_close
from test_optim import CASES

import fastbp as fb

pytestmark = pytest.mark.skipif("numba" not in fb.available_backends(),
                                reason=f"numba backend unavailable: {fb.backend_status()['numba']}")

OPTIMIZERS = {
    "sgd": lambda: fb.optim.SGD(lr=0.05),
    "sgd_nesterov_wd": lambda: fb.optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda: fb.optim.Adam(lr=0.01, weight_decay=0.01),
    "adamw": lambda: fb.optim.AdamW(lr=0.01, weight_decay=0.1),
    "rmsprop_momentum": lambda: fb.optim.RMSProp(lr=0.01, momentum=0.5, weight_decay=0.01),
}


def _targets(rng, loss, B, n):
    if loss == "cross_entropy":
        return rng.integers(0, n, B)
    if loss == "cross_entropy_onehot":
        return np.eye(n)[rng.integers(0, n, B)]
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, (B, n)).astype(float)
    return rng.standard_normal((B, n))


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_onehot", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
def test_whole_step_kernel_equals_the_op_by_op_path(monkeypatch, opt, loss, act):
    from fastbp.backends import numba_backend

    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 5))
    y = _targets(rng, loss, 12, 3)
    loss_name = "cross_entropy" if loss.startswith("cross") else loss
    results = []
    for whole in (True, False):  # the whole-step kernel, then the ops one by one
        monkeypatch.setattr(numba_backend, "WHOLE_STEP", whole)
        model = fb.MLP([5, 7, 6, 3], activation=act, dtype="float64", seed=1, backend="numba")
        trainer = fb.Trainer(model, loss=loss_name, optimizer=OPTIMIZERS[opt](), batch_size=4, seed=0)
        history = trainer.fit(X, y, epochs=2, verbose=0)
        results.append((model.get_weights(), history["loss"]))
    (w_whole, loss_whole), (w_ops, loss_ops) = results
    assert_close(loss_whole, loss_ops, "float64")
    for a, b in zip(w_whole, w_ops):
        assert_close(a, b, "float64", rtol=1e-11, atol=1e-13)
    assert not np.allclose(w_whole[0], fb.MLP([5, 7, 6, 3], seed=1, dtype="float64").get_weights()[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes,batch", [([20, 32, 16, 4], 16), ([300, 256, 128, 10], 96)])
def test_training_is_bit_identical_from_run_to_run(dtype, sizes, batch):
    """Kernels, BLAS threads and all: the same inputs give the same bits, each of five times."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((3 * batch, sizes[0])), rng.integers(0, sizes[-1], 3 * batch)
    runs = []
    for _ in range(5):
        model = fb.MLP(sizes, dtype=dtype, seed=2, backend="numba")
        fb.Trainer(model, optimizer=fb.optim.Adam(1e-3), batch_size=batch, seed=4).fit(X, y, epochs=2,
                                                                                      verbose=0)
        runs.append(model.get_weights())
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_warmup_reports_seconds_and_the_cache_goes_to_numba_cache_dir(tmp_path):
    cache = tmp_path / "numba-cache"
    code = ("import fastbp as fb; s = fb.backends.resolve_backend('numba').warmup(dtypes=['float64'], "
            "activations=['relu']); print(s)")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) > 0
    index_files = list(cache.rglob("*.nbi"))
    assert any("_numba_kernels" in p.name for p in index_files), index_files


def test_numba_without_scipy_is_unavailable_and_says_why(monkeypatch):
    import sys

    from fastbp.backends import BackendUnavailable, numba_backend

    monkeypatch.setitem(sys.modules, "scipy.linalg.cython_blas", None)  # as if scipy were not installed
    with pytest.raises(BackendUnavailable, match="need scipy"):
        numba_backend.create()


def test_whole_step_follows_optimizer_changes_between_steps():
    """The kernel reads the hyperparameters each step: a changed one, or a new optimizer, takes effect."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 4)), rng.integers(0, 3, 16)
    ref = fb.MLP([4, 6, 3], dtype="float64", seed=0, backend="numpy")
    model = fb.MLP([4, 6, 3], dtype="float64", seed=0, backend="numba")
    for m in (ref, model):
        opt = fb.optim.SGD(lr=0.1, momentum=0.9)
        trainer = fb.Trainer(m, optimizer=opt, batch_size=16)
        trainer.step(X, y)
        opt.replace(momentum=0.5)  # changed between steps
        trainer.step(X, y)
        trainer2 = fb.Trainer(m, optimizer=fb.optim.Adam(lr=0.01), batch_size=16)  # a new optimizer
        trainer2.step(X, y)
    for a, b in zip(ref.get_weights(), model.get_weights()):
        assert_close(a, b, "float64", atol=1e-13)


@pytest.mark.parametrize("name", ["sgd_nesterov_wd", "adamw", "rmsprop_momentum_wd"])
def test_whole_step_update_equals_the_op_by_op_update_bit_for_bit(monkeypatch, name):
    """The whole-step kernel applies the same update kernels to the same gradient as the ops path."""
    from fastbp.backends import numba_backend

    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    weights = []
    for whole in (True, False):
        monkeypatch.setattr(numba_backend, "WHOLE_STEP", whole)
        model = fb.MLP([6, 5, 3], dtype="float32", seed=0, backend="numba")
        trainer = fb.Trainer(model, optimizer={c[0]: c[1] for c in CASES}[name](), batch_size=16)
        trainer.step(X, y)  # one step: both paths start from the same parameters and gradient
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_the_kernel_cache_never_goes_into_the_install(tmp_path, read_only):
    """Installed in a writable site-packages, the kernels still compile into fastbp's per-user cache, not
    into a __pycache__ of the package: files left there outlive `pip uninstall` and then shadow the next
    install (an empty fastbp/backends imported as a namespace package). Installed where nothing may be
    written (a system site-packages, a container image), training works the same. As root, permissions
    do not stop writes, so the read-only copy is mounted read-only in a private mount namespace."""
    import shutil
    import stat

    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(fb.__file__), site / "fastbp", ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    code = ("import numpy as np, fastbp as fb; m = fb.MLP([4, 8, 3], backend='numba', seed=0); "
            "t = fb.Trainer(m, optimizer=fb.optim.Adam(0.01)); X = np.ones((6, 4)); y = np.array([0, 1, 2, 0, 1, 2]); "
            "first = t.step(X, y); [t.step(X, y) for _ in range(20)]; print(first, t.step(X, y))")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_CACHE_DIR", "FASTBP_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH"))}
    env.update(HOME=str(home), PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-c", code]
    if read_only and os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only install")
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root and unshare -m is not permitted: {probe.stderr.decode().strip()}")
        mount = f"mount --bind {site} {site} && mount -o remount,bind,ro {site} {site} && exec \"$@\""
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh", *command]
    elif read_only:
        for path in [site, *site.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert result.returncode == 0, result.stderr
    first, last = (float(v) for v in result.stdout.split())
    assert last < first  # it trained
    assert not list(site.rglob("__pycache__")), "something was written into the install"
    assert any("_numba_kernels" in p.name for p in (home / ".cache" / "fastbp" / "numba").rglob("*.nbi"))


@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")  # the strided case, by design
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["plain", "a_transposed", "b_transposed", "strided", "one_row", "one_column"])
def test_gemm_routes_agree_with_numpy(dtype, layout):
    """_numba_blas.gemm through NumPy's BLAS (where found) and through Numba's np.dot gives NumPy's matmul
    for every operand layout the kernels use, falling back to np.dot for the others."""
    from fastbp.backends import _numba_blas as blas

    rng = np.random.default_rng(0)
    m, k, n = {"one_row": (1, 9, 7), "one_column": (6, 9, 1)}.get(layout, (6, 9, 7))
    A = rng.standard_normal((k, m)).astype(dtype).T if layout == "a_transposed" else \
        rng.standard_normal((m, k)).astype(dtype)
    B = rng.standard_normal((n, k)).astype(dtype).T if layout == "b_transposed" else \
        rng.standard_normal((k, n)).astype(dtype)
    if layout == "strided":
        A = rng.standard_normal((2 * m, 2 * k)).astype(dtype)[::2, ::2]
    expected = A.astype(np.float64) @ B.astype(np.float64)
    for route in (blas.ROUTE_NUMPY if blas.ROUTE == blas.ROUTE_NUMPY else blas.ROUTE_NUMBA, blas.ROUTE_NUMBA):
        C = np.full((m, n), np.nan, dtype)
        blas.gemm(A, B, C, route)
        assert_close(C, expected, dtype, rtol=1e-5 if dtype == "float32" else 1e-12)
    if blas.ROUTE == blas.ROUTE_NUMPY and layout in ("plain", "a_transposed", "b_transposed"):
        C = np.empty((m, n), dtype)
        blas.gemm(A, B, C, blas.ROUTE_NUMPY)
        np.testing.assert_array_equal(C, np.matmul(A, B))  # the same library and routine: the same bits


def test_numba_reports_its_gemm_library():
    from fastbp.backends import _numba_blas as blas

    bk = fb.backends.resolve_backend("numba")
    assert bk.blas_route == blas.ROUTE and bk.blas == blas.DESCRIPTION
    if blas._numpy_openblas() is not None and os.environ.get("FASTBP_NUMBA_BLAS") != "scipy":
        assert blas.ROUTE == blas.ROUTE_NUMPY, blas.DESCRIPTION  # NumPy >= 2's wheels bundle it


# ------------------------------------------------------------------ the split step (batch in parts, side by side)
needs_two_threads = pytest.mark.skipif(
    "numba" in fb.available_backends() and __import__("numba").config.NUMBA_NUM_THREADS < 2,
    reason="Numba has one thread here: the step never splits")


def _numba_split(monkeypatch, mode):
    from fastbp.backends import numba_backend

    monkeypatch.setattr(numba_backend, "SPLIT", mode)
    return numba_backend


@needs_two_threads
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy_onehot", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_split_step_equals_the_whole_batch_step(monkeypatch, opt, loss, clip):
    """The batch cut into parts, each part's forward and backward on its own thread and the gradients
    summed, trains as the whole batch does (the sums in another order: float64 rounding apart), with the
    same losses and accuracies; batch 13 splits unevenly, and the last batch of 5 rows too."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((31, 5))
    y = _targets(rng, loss, 31, 3)
    loss_name = "cross_entropy" if loss.startswith("cross") else loss
    results = []
    for mode in ("always", "never"):
        numba_backend = _numba_split(monkeypatch, mode)
        model = fb.MLP([5, 7, 6, 3], activation="leaky_relu", dtype="float64", seed=1, backend="numba")
        trainer = fb.Trainer(model, loss=loss_name, optimizer=OPTIMIZERS[opt](), batch_size=13, seed=0,
                             clip_norm=clip)
        history = trainer.fit(X, y, epochs=3, verbose=0)
        plan = model.backend._whole_step_plan(model, 13)
        threads = __import__("numba").config.NUMBA_NUM_THREADS
        assert plan.parts == (min(threads, 13) if mode == "always" else 1) and plan.split() == (mode == "always")
        assert numba_backend.split_parts(model.sizes, 5) == (min(threads, 5) if mode == "always" else 1)
        results.append((model.get_weights(), history))
    (w_split, h_split), (w_whole, h_whole) = results
    assert_close(h_split["loss"], h_whole["loss"], "float64", rtol=1e-12)
    if "accuracy" in h_whole.keys():
        assert h_split["accuracy"] == h_whole["accuracy"]
    for a, b in zip(w_split, w_whole):
        assert_close(a, b, "float64", rtol=1e-11, atol=1e-13)


@needs_two_threads
def test_split_step_gradient_equals_the_reference(monkeypatch):
    """One split step in float32 against the NumPy reference's step: the parameters agree to float32
    rounding, and the gradient phase alone (data-parallel training's) gives the reference's gradient."""
    _numba_split(monkeypatch, "always")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 64)), rng.integers(0, 10, 64)
    models = {}
    for name in ("numpy", "numba"):
        model = fb.MLP([64, 128, 128, 10], dtype="float32", seed=0, backend=name)
        fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=64).step(X, y)
        models[name] = model
    for a, b in zip(models["numba"].get_weights(), models["numpy"].get_weights()):
        assert_close(a, b, "float32")
    model, ref = models["numba"], models["numpy"]
    Xd, yd = model.prepare_batch(X, y, "cross_entropy")
    value, _ = model.backend.train_gradients(model, Xd, yd, "cross_entropy")
    assert model.backend._whole_step_plan(model, 64).split()
    want, grads = ref.loss_and_grads(X, y, "cross_entropy")
    assert_close(value, want, "float32")
    assert_close(model.flat_grad(), np.concatenate([g.reshape(-1) for g in grads]), "float32")


@needs_two_threads
def test_split_step_skips_a_nonfinite_update_and_raises_as_the_whole_step(monkeypatch):
    _numba_split(monkeypatch, "always")
    rng = np.random.default_rng(0)
    model = fb.MLP([4, 8, 3], dtype="float32", seed=0, backend="numba")
    before = model.flat_parameters().copy()
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=8)
    X = rng.standard_normal((8, 4)) * 1e30  # the loss overflows
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.step(X, rng.integers(0, 3, 8))
    np.testing.assert_array_equal(model.flat_parameters(), before)
    assert trainer.steps == 0


@needs_two_threads
def test_split_step_follows_numbas_thread_count(monkeypatch):
    """With Numba held to one thread (numba.set_num_threads, fastbp.threads), a split plan takes the batch
    whole, and gives the same steps as a plan that never splits."""
    import numba

    _numba_split(monkeypatch, "always")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((32, 6)), rng.integers(0, 3, 32)
    model = fb.MLP([6, 9, 3], dtype="float64", seed=0, backend="numba")
    trainer = fb.Trainer(model, optimizer=fb.optim.SGD(0.1), batch_size=32)
    trainer.step(X, y)
    plan = model.backend._whole_step_plan(model, 32)
    assert plan.parts == min(numba.config.NUMBA_NUM_THREADS, 32)
    with fb.threads.num_threads(1):
        assert numba.get_num_threads() == 1 and not plan.split()
        trainer.step(X, y)
    _numba_split(monkeypatch, "never")
    whole = fb.MLP([6, 9, 3], dtype="float64", seed=0, backend="numba")
    trainer = fb.Trainer(whole, optimizer=fb.optim.SGD(0.1), batch_size=32)
    trainer.step(X, y)
    trainer.step(X, y)
    for a, b in zip(model.get_weights(), whole.get_weights()):
        assert_close(a, b, "float64", rtol=1e-12, atol=1e-14)


def test_split_rule(monkeypatch):
    """'auto' splits mid-sized steps and keeps tiny and large ones whole; a wrong setting is refused."""
    import numba

    numba_backend = _numba_split(monkeypatch, "auto")
    threads = numba.config.NUMBA_NUM_THREADS
    assert numba_backend.split_parts([64, 128, 128, 10], 64) == min(threads, 4)
    assert numba_backend.split_parts([16, 32, 32, 2], 32) == 1  # 38 kflop a GEMM: threads cost more
    assert numba_backend.split_parts([784, 1024, 1024, 10], 256) == 1  # BLAS's threads do better
    assert numba_backend.split_parts([64, 128, 128, 10], 16) == 1  # parts of fewer than 16 rows
    monkeypatch.setattr(numba_backend, "SPLIT", "sometimes")
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        numba_backend.split_parts([4, 3], 8)


@needs_two_threads
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
def test_split_inference_equals_the_layer_by_layer_forward(monkeypatch, dtype, act):
    """Where the rule splits a forward pass (``forward_parts``), forward, predict and evaluate run it in
    parts on Numba's threads (``forward_split``) and give what the layers one by one give (the NumPy
    reference's ops): 301 rows split unevenly."""
    numba_backend = _numba_split(monkeypatch, "auto")
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((301, 64)).astype(dtype), rng.integers(0, 10, 301)
    model = fb.MLP([64, 128, 64, 10], activation=act, dtype=dtype, seed=0, backend="numba")
    model.loss_ = "cross_entropy"
    assert numba_backend.forward_parts(model.sizes, 301) >= 2
    split = model.backend.forward_rows(model, model.backend.asarray(X, dtype))
    assert split is not None
    reference = fb.MLP([64, 128, 64, 10], activation=act, dtype=dtype, seed=0, backend="numpy").forward(X)
    assert_close(split, reference, dtype, rtol=1e-12 if dtype == "float64" else 1e-5)
    np.testing.assert_array_equal(model.forward(X), split)
    trainer = fb.Trainer(model)
    got = (model.predict(X), trainer.evaluate(X, y))
    monkeypatch.setattr(numba_backend, "SPLIT", "never")
    assert model.backend.forward_rows(model, model.backend.asarray(X, dtype)) is None
    np.testing.assert_array_equal(got[0], model.predict(X))
    assert got[1]["accuracy"] == trainer.evaluate(X, y)["accuracy"]


@needs_two_threads
def test_split_inference_is_declined_where_it_does_not_apply(monkeypatch):
    """Layer by layer (None) for activations the kernels do not fuse, for input of another dtype than the
    model's, for passes the rule keeps whole (too few rows, too much work), and in one-thread Numba."""
    import numba

    numba_backend = _numba_split(monkeypatch, "auto")
    bk = fb.backends.resolve_backend("numba")
    X = np.random.default_rng(0).standard_normal((301, 64))
    assert bk.forward_rows(fb.MLP([64, 128, 10], activation="tanh", dtype="float64", backend=bk), X) is None
    assert bk.forward_rows(fb.MLP([64, 128, 10], dtype="float32", backend=bk), X) is None  # X is float64
    model = fb.MLP([64, 128, 10], dtype="float64", backend=bk)
    assert bk.forward_rows(model, X) is not None
    assert bk.forward_rows(model, X[:20]) is None  # parts of fewer than 16 rows
    assert numba_backend.forward_parts([784, 1024, 1024, 10], 4096) == 1  # BLAS's threads do better
    with fb.threads.num_threads(1):
        assert numba.get_num_threads() == 1 and bk.forward_rows(model, X) is None


_LAYER_SCRIPT = r"""
import sys, threading
import numpy as np
import fastbp as fb
from fastbp.backends import numba_backend
numba_backend.SPLIT = sys.argv[1]
rng = np.random.default_rng(0)
X, y = rng.standard_normal((64, 64)).astype(np.float32), rng.integers(0, 10, 64)
models = [fb.MLP([64, 128, 128, 10], seed=i, backend="numba") for i in range(2)]
trainers = [fb.Trainer(m, optimizer=fb.optim.SGD(1e-2)) for m in models]
for t in trainers:
    t.step(X, y)
print("parts", [m.backend._whole_step_plan(m, 64).parts for m in models])
def train(t):
    for _ in range(300):
        t.step(X, y)
        t.model.forward(np.concatenate([X] * 4))  # the split inference pass too
threads = [threading.Thread(target=train, args=(t,)) for t in trainers]
[t.start() for t in threads]
[t.join() for t in threads]
print("trained", all(np.isfinite(m.flat_parameters()).all() for m in models))
"""


@needs_two_threads
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "always"])
def test_split_on_numbas_workqueue_layer(mode):
    """Numba's workqueue layer (its fallback where neither GNU OpenMP nor TBB loads) runs a split step
    several times slower than the whole batch, and aborts the process when two Python threads launch on
    it at once: "auto" keeps batches whole there; "always" splits, its launches taking turns, while two
    threads train a model each."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    out = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT, mode], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == ("parts [1, 1]" if mode == "auto" else "parts [2, 2]"), out.stdout
    assert lines[1] == "trained True", out.stdout


_PARTS_SCRIPT = r"""
import os, sys
import numpy as np
import fastbp as fb
from fastbp.backends import numba_backend
rng = np.random.default_rng(0)
X, y = rng.standard_normal((50, 6)), rng.integers(0, 4, 50)
weights = []
for mode in ("always", "never"):
    numba_backend.SPLIT = mode
    model = fb.MLP([6, 10, 8, 4], dtype="float64", seed=0, backend="numba")
    trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=25, seed=0)
    trainer.fit(X, y, epochs=2, verbose=0)
    print(mode, model.backend._whole_step_plan(model, 25).parts)
    weights.append(model.flat_parameters().copy())
print("max difference", float(np.abs(weights[0] - weights[1]).max()))
if sys.argv[1] == "fork":  # a child forked from a process that split: GNU OpenMP would abort it
    numba_backend.SPLIT = "always"
    pid = os.fork()
    if pid == 0:
        model = fb.MLP([6, 10, 8, 4], dtype="float64", seed=0, backend="numba")
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(1e-2), batch_size=25, seed=0)
        trainer.fit(X, y, epochs=1, verbose=0)
        plan = model.backend._whole_step_plan(model, 25)
        ok = plan.parts == 3 and not plan.split() and np.isfinite(model.flat_parameters()).all()
        os._exit(0 if ok and np.isfinite(model.forward(X)).all() else 3)  # inference: layer by layer
    print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.slow
def test_split_step_into_three_uneven_parts_and_in_a_forked_child(tmp_path):
    """NUMBA_NUM_THREADS=3: batch 25 in parts of 8, 8 and 9 rows trains as the whole batch does. A child
    forked after the parent split (GNU OpenMP, Numba's usual pool, aborts a child that uses it) trains
    on, its batch whole, and infers layer by layer."""
    env = dict(os.environ, NUMBA_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", _PARTS_SCRIPT, "fork"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "always 3" in lines and "never 1" in lines, out.stdout
    assert float(next(line for line in lines if line.startswith("max difference")).split()[-1]) < 1e-12
    assert "child exit 0" in lines, out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("mode,says", [
    ("", "splits small batches over Numba's"),
    ("", "FASTBP_NUMBA_SPLIT=auto); the first split makes NumPy's OpenBLAS threads sleep after 2^20 cycles"),
    ("OPENBLAS_THREAD_TIMEOUT=25", "FASTBP_NUMBA_SPLIT=auto); OPENBLAS_THREAD_TIMEOUT=25 is kept"),
    ("NUMBA_THREADING_LAYER=workqueue", "every batch whole on Numba's workqueue threading layer"),
    ("never", "takes every batch whole (FASTBP_NUMBA_SPLIT=never)"),
    ("always", "splits every batch over Numba's"),
    ("bogus", "FASTBP_NUMBA_SPLIT=bogus is not 'auto', 'always' or 'never'")])
def test_fastbp_info_says_how_the_numba_step_takes_its_batch(mode, says):
    from fastbp.backends import _numba_blas, _numba_kernels  # noqa: F401  (the route is found on import)

    if _numba_blas.ROUTE != _numba_blas.ROUTE_NUMPY:
        pytest.skip(f"the numba kernels do not call NumPy's OpenBLAS here: {_numba_blas.DESCRIPTION}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTBP_NUMBA_SPLIT", "OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")}
    if "=" in mode:
        env.update([mode.split("=")])
    elif mode:
        env["FASTBP_NUMBA_SPLIT"] = mode
    out = subprocess.run([sys.executable, "-m", "fastbp", "info"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("numba kernels' BLAS"))
    assert says in line, line


_QUIET_SCRIPT = r"""
import os, resource, sys, threading, time
import numpy as np
import fastbp as fb
from fastbp.backends import _numba_blas, numba_backend

def spinning_ms():  # CPU time the process burns in 0.3 s of sleep after a two-thread product
    A @ A
    r = resource.getrusage(resource.RUSAGE_SELF)
    before = r.ru_utime + r.ru_stime
    time.sleep(0.3)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime - before) * 1e3

A = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
numba_backend.SPLIT = sys.argv[1]
model = fb.MLP([64, 128, 128, 10], seed=0, backend="numba")
stop = threading.Event()
if sys.argv[2] == "thread":  # a second Python thread: NumPy's BLAS may be in use elsewhere
    threading.Thread(target=stop.wait).start()
if sys.argv[2] == "kernel":  # a thread of a Jupyter kernel's own (its heartbeat): no BLAS there
    def beat():
        stop.wait()
    beat.__module__ = "ipykernel.heartbeat"
    threading.Thread(target=beat, name="Heartbeat", daemon=True).start()
spin = sorted(spinning_ms() for _ in range(3))[1]
plan = model.backend._whole_step_plan(model, 64)
print("parts", plan.parts)
print("pool", _numba_blas.POOL)
print("environment", os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
print("spinning ms %.1f %.1f" % (spin, sorted(spinning_ms() for _ in range(3))[1]))
X, y = np.random.default_rng(1).standard_normal((256, 64)), np.random.default_rng(2).integers(0, 10, 256)
fb.Trainer(model, optimizer=fb.optim.SGD(1e-2), batch_size=64).fit(X, y, epochs=2, verbose=0,
                                                                   validation_data=(X, y))
print("trained", bool(np.isfinite(model.flat_parameters()).all()))
stop.set()
"""


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max([p["num_threads"] for p in threadpool_info() if p.get("internal_api") == "openblas"] or [1])


@needs_two_threads
@pytest.mark.parametrize("mode,threads", [("auto", "alone"), ("auto", "kernel"), ("auto", "thread"),
                                          ("always", "thread")])
def test_a_split_quiets_numpys_openblas_threads(mode, threads):
    """The first plan that splits makes NumPy's OpenBLAS threads sleep soon after their last job (they
    spin ~0.1 s by default, on the cores the split's threads need): the CPU time a process burns in 0.3 s
    of sleep after a two-thread product drops from ~100 ms to a few. The environment variable it sets
    for OpenBLAS is taken back out, and training runs on. While another Python thread runs, the pool
    cannot be restarted safely: "auto" keeps the batch whole, "always" splits all the same; a Jupyter
    kernel's own threads (here one posing as its heartbeat) never call BLAS and do not count."""
    from fastbp.backends import _numba_blas, _numba_kernels  # noqa: F401  (the route is found on import)

    if _numba_blas.ROUTE != _numba_blas.ROUTE_NUMPY:
        pytest.skip(f"the numba kernels do not call NumPy's OpenBLAS here: {_numba_blas.DESCRIPTION}")
    if _blas_threads() < 2:
        pytest.skip("NumPy's OpenBLAS runs on one thread here: it has no threads to quiet")
    pytest.importorskip("resource", reason="the check reads the process's CPU time through resource (POSIX)")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOTO_THREAD_TIMEOUT")}
    out = subprocess.run([sys.executable, "-c", _QUIET_SCRIPT, mode, threads], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    parts, before, after = int(said["parts"]), *(float(v) for v in said["spinning"].split()[-2:])
    assert said["environment"] == "None" and said["trained"] == "True", out.stdout
    assert before > 30, out.stdout  # OpenBLAS's default: its threads spin on after the product
    if threads in ("alone", "kernel"):
        assert parts >= 2 and "sleep after 2^20 cycles" in said["pool"], out.stdout
        assert after < min(15.0, before / 4), out.stdout
    else:
        assert "other Python threads" in said["pool"] and after > 30, out.stdout
        assert (parts == 1) == (mode == "auto"), out.stdout


@needs_two_threads
def test_warmup_compiles_the_split_step_unless_it_is_turned_off(monkeypatch):
    from fastbp.backends import _numba_kernels as k

    _numba_split(monkeypatch, "auto")
    backend = fb.backends.resolve_backend("numba")
    backend.warmup(dtypes=["float64"], activations=["relu"])
    for kernel in (k.train_step_split, k.gradients_split, k.forward_split):  # update_split: in train_step_split
        assert any("float64" in str(sig) for sig in kernel.signatures), kernel
