"""The benchmark harness's logic on tiny configs: FLOP counts, the floor's GEMM list, ratios, JSON."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import graph_probe

from fastbp import bench
from fastbp.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_gemm_list_per_layer_first_layer_has_no_input_gradient():
    gemms = bench.gemm_list([3, 4, 5], batch=2)
    assert gemms == [
        {"layer": 1, "role": "forward", "m": 2, "k": 3, "n": 4},
        {"layer": 1, "role": "weight_grad", "m": 3, "k": 2, "n": 4},
        {"layer": 2, "role": "forward", "m": 2, "k": 4, "n": 5},
        {"layer": 2, "role": "weight_grad", "m": 4, "k": 2, "n": 5},
        {"layer": 2, "role": "input_grad", "m": 2, "k": 5, "n": 4},
    ]


def test_flop_counts():
    # mnist: S = 784*1024 + 1024*1024 + 1024*10 = 1,861,632 multiply-adds per sample and step
    sizes, B = [784, 1024, 1024, 10], 256
    S = 784 * 1024 + 1024 * 1024 + 1024 * 10
    assert bench.forward_flops(sizes, B) == 2 * B * S
    # backward: 4 B S, less the first layer's input gradient 2 B 784 1024
    assert bench.backward_flops(sizes, B) == 4 * B * S - 2 * B * 784 * 1024
    assert bench.step_flops(sizes, B) == 6 * B * S - 2 * B * 784 * 1024 == 2_448_424_960
    assert bench.step_flops([10, 3], 4) == 2 * 4 * 10 * 3 * 2  # one layer: forward + weight gradient only


def _row(backend, name, median, floor=None):
    return {"backend": backend, "name": name, "median_s": median, "floor": floor}


def test_ratio_arithmetic():
    rows = bench.add_ratios([
        _row("blas:numpy", "floor:step", 0.010), _row("blas:numpy", "floor:forward", 0.004),
        _row("blas:scipy", "floor:step", 0.0125), _row("blas:scipy", "floor:forward", 0.0032),
        _row("numpy", "step_sgd", 0.011, "step"), _row("numpy", "forward", 0.005, "forward"),
        _row("numpy-naive", "step_sgd", 0.0132, "step"), _row("torch-cpu", "step_sgd", 0.022, "step"),
        _row("torch-cpu", "forward", 0.006, "forward"),
        _row("cupy", "floor:step", 0.001), _row("cupy", "step_sgd", 0.0015, "step"),
    ])
    r = {(x["backend"], x["name"]): x for x in rows}
    # a CPU time is compared with the fastest library's floor of its kind, and with every library's beside it
    assert r[("numpy", "step_sgd")]["ratio_to_floor"] == pytest.approx(1.1)
    assert r[("numpy", "step_sgd")]["floor_library"] == "blas:numpy"
    assert r[("numpy", "step_sgd")]["ratio_to_floors"] == pytest.approx({"blas:numpy": 1.1, "blas:scipy": 0.88})
    assert r[("numpy", "forward")]["ratio_to_floor"] == pytest.approx(0.005 / 0.0032)
    assert r[("numpy", "forward")]["floor_library"] == "blas:scipy"
    assert r[("numpy", "step_sgd")]["speedup_vs_naive"] == pytest.approx(1.2)
    assert r[("numpy", "step_sgd")]["speedup_vs_torch"] == pytest.approx(2.0)
    assert r[("numpy", "forward")]["speedup_vs_torch"] == pytest.approx(1.2)
    assert r[("blas:numpy", "floor:step")]["ratio_to_floor"] is None
    # the peers are held to the same floor
    assert r[("torch-cpu", "step_sgd")]["ratio_to_floor"] == pytest.approx(2.2)
    assert r[("numpy-naive", "step_sgd")]["speedup_vs_naive"] is None
    # a GPU backend has its own floor, never a CPU library's
    assert r[("cupy", "step_sgd")]["ratio_to_floor"] == pytest.approx(1.5)
    assert r[("cupy", "step_sgd")]["ratio_to_floors"] is None
    notes = bench.floor_notes([dict(x, config="small", dtype="float32") for x in rows])
    assert notes[0] == ("small float32: CPU GEMM floors of the step (median ms): numpy 10.000, scipy 12.500; "
                        "x floor is against the fastest, numpy")
    assert notes[1] == "  numpy step_sgd x each floor: numpy 1.100, scipy 0.880"


def test_ratios_pair_samples_of_the_same_round():
    # the machine slows down 2x in the second half: per-repetition ratios stay 1.2, medians would mislead
    floor = [0.010] * 4 + [0.020] * 4
    step = [0.012] * 4 + [0.024] * 4
    rows = bench.add_ratios([dict(_row("blas:scipy", "floor:step", 0.015), samples_s=floor),
                             dict(_row("numba", "step_sgd", 0.018, "step"), samples_s=step)])
    r = {x["name"]: x for x in rows}
    assert r["step_sgd"]["ratio_to_floor_iqr"] == pytest.approx([1.2, 1.2])
    assert r["step_sgd"]["ratio_to_floor"] == pytest.approx(1.2)  # the ratio of medians would say 0.018/0.015
    assert r["floor:step"]["ratio_to_floor_iqr"] is None
    # different repetition counts cannot be paired
    rows = bench.add_ratios([dict(_row("blas:scipy", "floor:step", 0.015), samples_s=floor[:5]),
                             dict(_row("numba", "step_sgd", 0.018, "step"), samples_s=step)])
    unpaired = {x["name"]: x for x in rows}["step_sgd"]
    assert unpaired["ratio_to_floor_iqr"] is None
    assert unpaired["ratio_to_floor"] == pytest.approx(0.018 / 0.015)
    assert "1.200 (1.20-1.20)" in bench.format_table([dict(rows[1], config="small", dtype="float32",
                                                           samples_per_s=1.0, gflops=None, min_s=0.01, max_s=0.02,
                                                           ratio_to_floor=1.2, ratio_to_floor_iqr=[1.2, 1.2],
                                                           speedup_vs_naive=None, speedup_vs_torch=None)])


def test_naive_step_is_real_sgd():
    import numpy as np

    import fastbp as fb

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    model = fb.MLP([5, 6, 3], dtype="float64", seed=0, backend="numpy")
    w = model.get_weights()
    weights = [[w[0], w[1]], [w[2], w[3]]]
    bench.naive_numpy_step(weights, X, y, 0.1)
    _, grads = model.loss_and_grads(X, y, "cross_entropy")
    for new, old, g in zip([p for pair in weights for p in pair], w, grads):
        np.testing.assert_allclose(new, old - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_bench_cli_writes_the_json_schema(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--sizes", "8,16,4", "--batch", "8", "--reps", "2", "--min-time", "0.0005",
                 "--settle", "0", "--no-peers", "--dtype", "float64", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "floor:step" in text and "step_adam" in text
    data = json.loads(out.read_text())
    assert data["schema"] == "fastbp-bench/1"
    env = data["environment"]
    for key in ("cpu", "cpu_count", "cpu_simd", "blas", "packages", "python", "env", "backends", "gpu"):
        assert key in env
    assert "OPENBLAS_CORETYPE" in env["env"]
    names = {(r["backend"], r["name"]) for r in data["results"]}
    for bk in data["argv"]["backend"] or env["backends"]:
        if env["backends"].get(bk) != "available":
            continue
        for name in ("step_sgd", "internal:step_sgd", "step_adam", "forward", "op:dense_forward",
                     "op:output_delta", "op:backprop_dense", "op:update_sgd", "op:update_adam"):
            assert (bk, name) in names
    libraries = ["numpy"] + (["scipy"] if env["backends"].get("numba") == "available" else [])
    for library in libraries + (["torch"] if bench._torch_available() else []):
        for name in ("floor:step", "floor:forward", "floor:backward"):
            assert (f"blas:{library}", name) in names
    rows = {(r["backend"], r["name"]): r for r in data["results"]}
    step = rows[("numpy", "step_sgd")]
    assert step["flops"] == bench.step_flops([8, 16, 4], 8)
    assert step["reps"] == 2 and step["min_s"] <= step["median_s"] <= step["max_s"]
    floor = rows[(step["floor_library"], "floor:step")]
    assert floor["median_s"] == min(rows[(f"blas:{lib}", "floor:step")]["median_s"] for lib in libraries
                                    + (["torch"] if bench._torch_available() else []))
    assert len(step["samples_s"]) == len(floor["samples_s"]) == 2
    per_round = [s / f for s, f in zip(step["samples_s"], floor["samples_s"])]
    assert step["ratio_to_floor"] == pytest.approx(sum(per_round) / 2)  # the median of two rounds
    assert step["gflops"] == pytest.approx(step["flops"] / step["median_s"] / 1e9)
    assert step["samples_per_s"] == pytest.approx(8 / step["median_s"])
    assert step["first_call_s"] > 0


def test_bench_warns_about_openblas_variables():
    env = {"env": {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576"}, "blas": [{}]}
    warns = bench.warnings_for(env)
    assert len(warns) == 2 and "env -u OPENBLAS_CORETYPE" in warns[0]
    assert bench.warnings_for({"env": {}, "blas": [{}]}) == []


def test_bench_size_mistakes_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--sizes", "8,x", "--batch", "4"])
    assert exc.value.code == 2 and "--sizes" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["bench", "--sizes", "8"], "go together"),
    (["bench", "--sizes", "8", "--batch", "4"], ">= 2 widths"),
    (["bench", "--config", "large"], "GPU"),
    (["bench", "--reps", "0"], "--reps"),
])
def test_bench_argument_errors(capsys, argv, match):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------ benchmarks/gemm_libraries.py
def _gemm_libraries():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_libraries.py"
    spec = importlib.util.spec_from_file_location("gemm_libraries", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("role", ["forward", "weight_grad", "input_grad"])
def test_gemm_libraries_operands_have_the_step_layouts(role):
    gl = _gemm_libraries()
    A, B, out = gl._operands({"role": role, "m": 5, "k": 3, "n": 4}, np.dtype("float32"), np.random.default_rng(0))
    assert A.shape == (5, 3) and B.shape == (3, 4) and out.shape == (5, 4)
    assert A.flags.f_contiguous == (role == "weight_grad") and A.flags.c_contiguous == (role != "weight_grad")
    assert B.flags.f_contiguous == (role == "input_grad") and B.flags.c_contiguous == (role != "input_grad")


@pytest.mark.parametrize("lib", ["numpy", "scipy"])
def test_gemm_libraries_worker_times_every_product_and_checks_it(lib):
    if lib == "scipy":
        pytest.importorskip("numba")
    gl = _gemm_libraries()
    result = gl.worker(lib, "small", "float32", 1e-4)
    assert [(g["role"], g["m"], g["k"], g["n"]) for g in result["gemms"]] == [
        (g["role"], g["m"], g["k"], g["n"]) for g in bench.gemm_list([64, 128, 128, 10], 64)]
    assert all(g["s"] > 0 for g in result["gemms"])


def test_gemm_libraries_mkl_call_is_correct_or_absent():
    """The ctypes cblas call (transposition flags, leading dimensions) against NumPy, where MKL is installed."""
    gl = _gemm_libraries()
    if gl._mkl_library() is None:
        with pytest.raises(ImportError):
            gl._gemm_fn("mkl", np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
        return
    rng = np.random.default_rng(1)
    for role in ("forward", "weight_grad", "input_grad"):
        for dtype in ("float32", "float64"):
            A, B, out = gl._operands({"role": role, "m": 7, "k": 5, "n": 3}, np.dtype(dtype), rng)
            gl._gemm_fn("mkl", A, B, out)()
            np.testing.assert_allclose(out, A @ B, rtol=1e-5)


def test_the_table_warns_of_ratios_below_the_floor_and_says_why_torch_is_missing():
    from fastbp.bench import table_notes

    rows = [{"config": "small", "backend": "numba", "name": "step_sgd", "ratio_to_floor": 0.93},
            {"config": "small", "backend": "numpy", "name": "step_sgd", "ratio_to_floor": 1.2},
            {"config": "small", "backend": "numpy", "name": "floor", "ratio_to_floor": None}]
    notes = table_notes(rows, torch_installed=False)
    assert len(notes) == 2 and "1 rows ran below their GEMM floor" in notes[0] and "small numba step_sgd" in notes[0]
    assert "PyTorch is not installed" in notes[1]
    assert table_notes(rows[1:], torch_installed=True) == []
    # a split step does its products side by side: below the floor by design, said so, not warned of
    split = "whole-step kernel, batch split in 2 parts on Numba's threads, BLAS on one thread"
    rows = [{"config": "small", "dtype": "float32", "backend": "numba", "name": name, "ratio_to_floor": 0.9,
             "step_route": split} for name in ("step_sgd", "internal:step_sgd", "op:dense_forward")]
    rows.append({"config": "small", "dtype": "float32", "backend": "numba", "name": "forward", "ratio_to_floor": 0.9,
                 "step_route": split, "forward_route": "rows split in 2 parts on Numba's threads, BLAS on one thread"})
    notes = table_notes(rows, torch_installed=True)
    assert len(notes) == 2 and "1 rows ran below" in notes[0] and "op:dense_forward" in notes[0]
    assert "below the floor by design: small float32 numba, small float32 numba forward" in notes[1]
    rows[-1]["forward_route"] = "layer by layer, GEMMs on BLAS's threads"  # a forward not split: warned of
    assert "2 rows ran below" in table_notes(rows, torch_installed=True)[0]


@pytest.mark.emulator
def test_the_gpu_kernel_profile_runs_every_op_on_the_emulated_gpu(tmp_path, capsys):
    """benchmarks/gpu_kernels.py (the per-kernel profile gpu_check.sh runs) on a tiny config: every op it
    times is there, with the bytes it moves (the timings mean nothing under the emulator)."""
    import runpy

    from conftest import EMULATED, EMULATOR_MISSING

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    script = runpy.run_path(str(ROOT / "benchmarks" / "gpu_kernels.py"))
    out = tmp_path / "k.json"
    assert script["main"](["--backend", EMULATED, "--sizes", "8,16,16,4", "--batch", "32", "--reps", "1",
                           "--rounds", "1", "--compute-dtype", "float16", "--optimizer", "adam",
                           "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    for name in ("copy (memory speed)", "step (internal)", "layer 2 forward epilogue", "layer 0 backward epilogue",
                 "output delta + loss", "gradient sum of squares", "adam update", "batch check"):
        assert name in rows and rows[name]["ms"] > 0, name
    n_params = 8 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4
    assert rows["adam update"]["bytes"] == n_params * (8 + 2 + 16 + 2)  # p, g, m and v, the float16 copy
    assert "float16" in capsys.readouterr().out


# ------------------------------------------------------------------ benchmarks/*_parts.py, numba_blas_route.py
@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", [
    ("numba_step_parts.py", ["--rounds", "1"],
     ["whole step (compiled loop)", "its GEMMs alone", "GEMM floor (from Python)", "whole step, called from Python",
      "Trainer._step (internal)", "Trainer.step (public)", "sgd update", "step minus its GEMMs"]),
    ("numba_blas_route.py", ["--config", "small", "--shape", "16-32-32-2:32", "--rounds", "1"],
     ["whole+numpy", "whole+scipy", "split+numpy", "ops+numpy", "config small (float32)", "the auto rule: split",
      "config 16-32-32-2:32 (float32)", "the auto rule: whole"]),
    ("numpy_reference_parts.py", ["--rounds", "1"],
     ["naive (textbook step)", "Trainer.step (public)", "Trainer._step (internal)", "backward", "SGD update",
      "lean", "lean, bias folded", "Trainer.step, folded gradients", "Trainer.step, batch not checked"]),
    ("numba_backward_layout.py", ["--config", "small", "--rounds", "1"],
     ["small    float32", "the numba kernels' BLAS"]),
])
def test_step_benchmark_scripts_run_and_report_every_part(script, args, expect):
    """The step benchmarks call private signatures (the numba kernels', the model's ops): run them, so a
    change there that breaks them fails here (numba_step_parts.py once passed its update records as a dict
    the kernel refused). numpy_reference_parts.py also checks its hand-written steps against the reference."""
    import subprocess
    import sys

    if script.startswith("numba"):
        pytest.importorskip("numba")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in expect:
        lines = [line for line in done.stdout.splitlines() if name in line]
        assert lines, f"{name!r} missing from:\n{done.stdout}"
        numbers = [float(tok) for line in lines for tok in line.replace(":", " ").split()
                   if tok.lstrip("-").replace(".", "", 1).isdigit()]
        # times are positive; a difference of two times ("step minus its GEMMs") is a number of either sign
        # (one round on a busy machine can put it below zero)
        assert numbers and (name.startswith("step minus") or any(x > 0 for x in numbers)), lines


# ------------------------------------------------------------------ benchmarks/gpu_graph_probe.py
def test_graph_probe_without_a_gpu_says_so_and_exits_0():
    import subprocess
    import sys

    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a GPU is usable here: gpu_check.sh runs the probe")
    except Exception:
        pass
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_graph_probe.py"
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no usable GPU" in done.stdout


@pytest.mark.emulator
def test_graph_probe_stages_run_on_the_emulated_cupy():
    """The probe on the emulated CuPy: fastbp's cuBLAS handle (the emulator's) equals cupy.matmul on the
    config's products, the fit with graphs replays steps and ends where the eager fit ends, bit for bit, and
    both fits are timed."""
    from conftest import EMULATED, EMULATOR_MISSING

    if EMULATOR_MISSING:
        pytest.skip(f"the CUDA emulator cannot run here: {EMULATOR_MISSING}")
    from fastbp.testing import fake_cupy

    report = graph_probe().probe([8, 16, 16, 3], 32, 2, batches=3, cupy=fake_cupy, backend=EMULATED)
    gemms = report["1 fastbp's cuBLAS handle vs cupy.matmul (max relative difference per product)"]
    assert isinstance(gemms, dict) and len(gemms) == 16 and max(gemms.values()) == 0, gemms
    assert report["2a fit without graphs"] == "off (Trainer(cuda_graphs=False))"
    assert report["2b fit with graphs"] == "5 steps replayed from 1 captured graph(s)", report
    assert report["2c parameters, graphs against eager: max difference"] == 0
    times = report["3 time per step, last epoch"]
    assert set(times) == {"eager (ms)", "graphs (ms)", "eager / graphs"} and min(times.values()) > 0
