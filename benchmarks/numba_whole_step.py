"""The numba backend's whole-step kernel against its ops one by one (SGD, float32): interleaved medians,
and their ratio as the median of the per-round ratios:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/numba_whole_step.py

It backs training through the whole-step kernel wherever it applies
(``fastbp.backends.numba_backend.WHOLE_STEP``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

import fastbp as fb
from fastbp.backends import numba_backend

CASES = [([64, 128, 128, 10], 64, 400), ([256, 512, 512, 10], 128, 100), ([784, 1024, 1024, 10], 256, 25)]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warm: int = 5) -> dict[str, list[float]]:
    """Seconds of each function per round, timed in turn, ``reps`` rounds."""
    for fn in fns.values():
        for _ in range(warm):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    backend = fb.backends.resolve_backend("numba")
    backend.warmup(dtypes=["float32"], activations=["relu"])
    rng = np.random.default_rng(0)
    print(f"{'sizes':24s} {'batch':>6s} {'whole-step us':>14s} {'op by op us':>12s} {'op/whole':>9s}")
    for sizes, batch, reps in CASES:
        fns = {}
        for label, whole in (("whole", True), ("ops", False)):
            model = fb.MLP(sizes, seed=0, backend=backend)
            trainer = fb.Trainer(model, optimizer=fb.optim.SGD(1e-3), batch_size=batch)
            X, y = model.prepare_batch(rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch),
                                       "cross_entropy")

            def step(trainer=trainer, X=X, y=y, whole=whole):
                numba_backend.WHOLE_STEP = whole
                trainer._step(X, y)

            fns[label] = step
        samples = interleaved(fns, reps)
        numba_backend.WHOLE_STEP = True
        whole, ops = (statistics.median(samples[k]) * 1e6 for k in ("whole", "ops"))
        ratio = statistics.median(o / w for o, w in zip(samples["ops"], samples["whole"]))  # per round
        print(f"{str(sizes):24s} {batch:6d} {whole:14.1f} {ops:12.1f} {ratio:9.3f}")


if __name__ == "__main__":
    main()
