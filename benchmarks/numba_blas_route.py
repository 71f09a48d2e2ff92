"""Which BLAS route makes the numba backend's training step fastest, per config?

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numba_blas_route.py [--config small] [--rounds 5]

The numba backend's GEMMs can run through NumPy's OpenBLAS (called by name from the compiled kernels,
``fastbp/backends/_numba_blas.py``) or through Numba's ``np.dot``, which calls SciPy's. Variants timed:

- ``whole+scipy``: the whole-step kernel on SciPy's BLAS (the route before NumPy's was added);
- ``whole+numpy``: the whole-step kernel on NumPy's BLAS (the default where NumPy bundles OpenBLAS);
- ``ops+numpy``: the ops one by one (``numba_backend.WHOLE_STEP = False``), GEMMs on NumPy's BLAS.

Each variant runs in its own process (thread pools of two BLAS libraries in one process slow each other),
in turn, ``--rounds`` times; each process times the public ``Trainer.step`` (SGD, float32 unless
``--dtype``) on one batch, the fastest of a few samples. Reported: per config the median over rounds of each
variant's time and its per-round ratio to ``whole+numpy``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {"whole+scipy": ("scipy", True), "whole+numpy": ("numpy", True), "ops+numpy": ("numpy", False)}

_CHILD = r"""
import json, sys, time
import numpy as np
import fastbp as fb
from fastbp.backends import numba_backend
from fastbp.bench import CONFIGS
config, dtype, whole = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
numba_backend.WHOLE_STEP = whole
sizes, batch = CONFIGS[config]["sizes"], CONFIGS[config]["batch"]
rng = np.random.default_rng(0)
X = rng.standard_normal((batch, sizes[0])).astype(dtype)
y = rng.integers(0, sizes[-1], batch)
model = fb.MLP(sizes, dtype=dtype, seed=0, backend="numba")
trainer = fb.Trainer(model, optimizer=fb.optim.SGD(1e-3), batch_size=batch)
trainer.step(X, y)
start = time.perf_counter()
trainer.step(X, y)
inner = max(1, int(0.05 / (time.perf_counter() - start)))
samples = []
for _ in range(7):
    start = time.perf_counter()
    for _ in range(inner):
        trainer.step(X, y)
    samples.append((time.perf_counter() - start) / inner)
print(json.dumps({"min": min(samples), "blas": model.backend.blas}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="fastbp.bench config (repeatable; default small, mnist)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    for config in args.config or ["small", "mnist"]:
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for name, (route, whole) in VARIANTS.items():
                env = dict(os.environ, FASTBP_NUMBA_BLAS=route)
                out = subprocess.run([sys.executable, "-c", _CHILD, config, args.dtype, "1" if whole else "0"],
                                     env=env, capture_output=True, text=True, check=True)
                record = json.loads(out.stdout.strip().splitlines()[-1])
                times[name].append(record["min"])
        results[config] = times
        base = times["whole+numpy"]
        print(f"config {config} ({args.dtype}), {args.rounds} rounds, one process per variant and round:")
        for name, ts in times.items():
            ratio = statistics.median(t / b for t, b in zip(ts, base))
            print(f"  {name:12s} median {statistics.median(ts) * 1e3:8.3f} ms  min {min(ts) * 1e3:8.3f} ms  "
                  f"x whole+numpy {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "rounds": args.rounds, "seconds": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
