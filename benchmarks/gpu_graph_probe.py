"""Does fastbp's training step run as a CUDA graph on this GPU, compute what eager steps compute, and what
does it save? A probe for the GPU check:

    python3 benchmarks/gpu_graph_probe.py [--config narrow] [--epochs 3] [--json FILE]

It reports, each stage on its own so that one failure does not hide the rest:

1. whether fastbp's own cuBLAS handle (``fastbp.backends._cublas``, what a graph's GEMMs go through)
   equals ``cupy.matmul`` on the config's products, float32 and bfloat16;
2. ``Trainer.fit`` with ``cuda_graphs=True`` against the same fit without (Adam, so that the per-step
   arguments in device memory are exercised): ``graph_status``, and the largest difference between the
   two runs' parameters (0 when the handle's GEMMs pick the kernels CuPy's pick);
3. the time per step of both fits' last epoch, and their ratio.

It changes nothing in fastbp; it always exits 0 (the check's log is its result).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any


def probe(sizes: list[int], batch: int, epochs: int, batches: int = 20, cupy: Any = None,
          backend: str = "cupy") -> dict[str, Any]:
    """The probe's stages on an MLP of ``sizes`` at ``batch`` rows, ``batches`` batches an epoch; ``cupy``
    and ``backend`` let a test run it on the emulated CuPy."""
    import numpy as np

    import fastbp as fb
    from fastbp.backends import resolve_backend
    from fastbp.bench import gemm_list
    from fastbp.bench.candidates import gemm_operands
    from fastbp.dtypes import half_dtype

    if cupy is None:
        import cupy
    report: dict[str, Any] = {"sizes": sizes, "batch": batch, "epochs": epochs, "cupy": cupy.__version__}
    bk = resolve_backend(backend)

    def stage(name: str, fn: Any) -> Any:
        try:
            result = fn()
            report[name] = result if result is not None else "ok"
        except Exception as exc:  # the probe reports what fails and goes on where it can
            report[name] = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"{name}: {report[name]}")
        return report[name]

    def gemms() -> dict[str, float]:
        stream = bk.graph_stream()
        handle = bk.blas_handle(stream)
        report["libcublas"] = handle.path
        rng = np.random.default_rng(0)
        worst = {}
        dtypes = ["float32"] + (["bfloat16"] if "bfloat16" in bk.compute_dtypes else [])
        with stream:
            for dtype in dtypes:
                for g in gemm_list(sizes, batch):
                    a, b = gemm_operands(g, lambda s: cupy.asarray(rng.standard_normal(s).astype(np.float32)))
                    a, b = (x.astype(np.float32 if dtype == "float32" else half_dtype(dtype)) for x in (a, b))
                    mine = handle.matmul(a, b, cupy.empty((a.shape[0], b.shape[1]), a.dtype))
                    want = cupy.matmul(a, b)
                    diff = cupy.abs(mine.astype(np.float32) - want.astype(np.float32)).max()
                    scale = max(float(cupy.abs(want.astype(np.float32)).max()), 1e-30)
                    worst[f"{dtype} {g['role']} {g['m']}x{g['k']}x{g['n']}"] = float(diff) / scale
        stream.synchronize()
        return worst

    stage("1 fastbp's cuBLAS handle vs cupy.matmul (max relative difference per product)", gemms)

    rng = np.random.default_rng(1)
    X = rng.standard_normal((batch * batches, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch * batches)
    runs: dict[bool, Any] = {}

    def fit(graphs: bool) -> str:
        model = fb.MLP(sizes, seed=0, backend=backend)
        trainer = fb.Trainer(model, optimizer=fb.optim.Adam(lr=1e-3), batch_size=batch, cuda_graphs=graphs)
        history = trainer.fit(X, y, epochs=epochs, verbose=0)
        runs[graphs] = (model.backend.to_numpy(model.flat_parameters()), history.epochs[-1]["time"] / batches,
                        trainer)
        return trainer.graph_status

    stage("2a fit without graphs", lambda: fit(False))
    stage("2b fit with graphs", lambda: fit(True))
    if len(runs) == 2:
        diff = float(np.abs(runs[True][0] - runs[False][0]).max())
        report["2c parameters, graphs against eager: max difference"] = diff
        print(f"2c parameters, graphs against eager: max difference {diff:.3g}")
        times = {"eager (ms)": runs[False][1] * 1e3, "graphs (ms)": runs[True][1] * 1e3,
                 "eager / graphs": runs[False][1] / runs[True][1]}
        report["3 time per step, last epoch"] = times
        print("3 time per step, last epoch:", json.dumps(times))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="narrow")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"no usable GPU through CuPy ({type(exc).__name__}: {exc}): nothing to probe")
        return 0
    from fastbp.bench import CONFIGS

    try:
        report = probe(CONFIGS[args.config]["sizes"], CONFIGS[args.config]["batch"], args.epochs)
        report["config"] = args.config
    except Exception as exc:
        traceback.print_exc()
        report = {"failed": f"{type(exc).__name__}: {exc}"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
