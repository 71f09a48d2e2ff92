"""Which route makes the numba backend's training step fastest, per config?

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numba_blas_route.py [--config small] [--rounds 5]
        [--shape 64-128-128-10:64 ...]

The numba backend's GEMMs can run through NumPy's OpenBLAS (called by name from the compiled kernels,
``fastbp/backends/_numba_blas.py``) or through Numba's ``np.dot``, which calls SciPy's; the whole step can
take the batch whole, its GEMMs on BLAS's threads, or split it into parts run side by side on Numba's
threads with BLAS on one (``numba_backend.split_parts``). Variants timed:

- ``whole+scipy``: the whole-step kernel, batch whole, on SciPy's BLAS (the route before NumPy's was added);
- ``whole+numpy``: the whole-step kernel, batch whole, on NumPy's BLAS;
- ``split+numpy``: the whole-step kernel with the batch split into as many parts as Numba has threads (forced
  where the backend's rule would not split), on NumPy's BLAS;
- ``ops+numpy``: the ops one by one (``numba_backend.WHOLE_STEP = False``), GEMMs on NumPy's BLAS.

What ``FASTBP_NUMBA_SPLIT=auto`` (its rule) would choose between ``whole+numpy`` and ``split+numpy`` is printed
with each config.

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

#: name: (FASTBP_NUMBA_BLAS, whole step, split)
VARIANTS = {"whole+scipy": ("scipy", True, False), "whole+numpy": ("numpy", True, False),
            "split+numpy": ("numpy", True, True), "ops+numpy": ("numpy", False, False)}

_CHILD = r"""
import json, sys, time
import numpy as np
import fastbp as fb
from fastbp.backends import numba_backend
from fastbp.bench import CONFIGS
config, dtype, whole, split = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
numba_backend.WHOLE_STEP = whole
if ":" in config:  # a shape, "64-128-128-10:64"
    sizes, batch = [int(n) for n in config.split(":")[0].split("-")], int(config.split(":")[1])
else:
    sizes, batch = CONFIGS[config]["sizes"], CONFIGS[config]["batch"]
numba_backend.SPLIT = "auto"
chosen = numba_backend.split_parts(sizes, batch)  # what FASTBP_NUMBA_SPLIT=auto would do
numba_backend.SPLIT = "always" if split else "never"
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
plan = model.backend._whole_step_plan(model, batch)
print(json.dumps({"min": min(samples), "blas": model.backend.blas, "chosen": chosen,
                  "parts": plan.parts if plan is not None else 0}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="fastbp.bench config (repeatable; default small, mnist)")
    parser.add_argument("--shape", action="append", default=[],
                        help="layer sizes and batch instead of a config, e.g. 64-128-128-10:64 (repeatable)")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="variants to time (default all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    variants = {name: VARIANTS[name] for name in args.variant or VARIANTS}
    base_name = "whole+numpy" if "whole+numpy" in variants else next(iter(variants))
    for config in (args.config or ([] if args.shape else ["small", "mnist"])) + args.shape:
        times: dict[str, list[float]] = {v: [] for v in variants}
        chosen = parts = 0
        for _ in range(args.rounds):
            for name, (route, whole, split) in variants.items():
                env = dict(os.environ, FASTBP_NUMBA_BLAS=route)
                out = subprocess.run([sys.executable, "-c", _CHILD, config, args.dtype, str(int(whole)),
                                      str(int(split))], env=env, capture_output=True, text=True, check=True)
                record = json.loads(out.stdout.strip().splitlines()[-1])
                times[name].append(record["min"])
                chosen = record["chosen"]
                parts = record["parts"] if split else parts
        results[config] = times
        base = times[base_name]
        print(f"config {config} ({args.dtype}), {args.rounds} rounds, one process per variant and round; split into "
              f"{parts} parts; the auto rule: {'split' if chosen > 1 else 'whole'}")
        for name, ts in times.items():
            ratio = statistics.median(t / b for t, b in zip(ts, base))
            print(f"  {name:12s} median {statistics.median(ts) * 1e3:8.3f} ms  min {min(ts) * 1e3:8.3f} ms  "
                  f"x {base_name} {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "rounds": args.rounds, "seconds": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
