"""Timing: candidates, calibrated and timed in interleaved rounds, and their summaries."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Candidate:
    """One thing to time: ``fn`` runs one unit of work (it synchronizes a GPU itself)."""

    name: str
    backend: str  # a fastbp backend, 'numpy-naive' or 'torch-cpu' / 'torch-cuda'
    fn: Callable[[], Any]
    flops: int
    floor: str | None = None  # the floor this one is compared with: 'step', 'forward', 'backward'
    family: str = ""  # the thread pools it keeps busy; defaults to ``backend``
    inner: int = 1
    samples: list[float] = field(default_factory=list)
    first_call_s: float | None = None


def _calibrate(c: Candidate, min_time: float) -> None:
    start = time.perf_counter()
    c.fn()
    c.first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    c.fn()
    once = max(time.perf_counter() - start, 1e-7)
    c.inner = max(1, min(1000, int(min_time / once)))


def run_interleaved(cands: list[Candidate], reps: int, min_time: float, settle: float = 0.25) -> None:
    """Calibrate each candidate, then time them in turn, ``reps`` rounds.

    Candidates are grouped by thread-pool family. Idle pool threads keep spinning for a while after their
    last job (OpenBLAS for about 0.1 s, OpenMP runtimes likewise) and steal the cores from whichever
    library runs next, so the run pauses ``settle`` seconds whenever the family changes. A pause leaves
    the cores cold (caches, clocks), which cost the first candidate after it about 6% at the small config
    (measured: the public step read 1.09-1.11x the internal one timed first, 1.03-1.05x timed second): the
    first candidate after a pause runs one untimed sample before its timed one.
    """
    cands = sorted(cands, key=lambda c: c.family or c.backend)
    last = None
    for c in cands:
        if last is not None and (c.family or c.backend) != last:
            time.sleep(settle)
        _calibrate(c, min_time)
        last = c.family or c.backend
    for _ in range(reps):
        for c in cands:
            family = c.family or c.backend
            if family != last:
                time.sleep(settle)
                last = family
                for _ in range(c.inner):  # warm the cores up again, untimed
                    c.fn()
            start = time.perf_counter()
            for _ in range(c.inner):
                c.fn()
            c.samples.append((time.perf_counter() - start) / c.inner)


def summarize(c: Candidate, batch: int) -> dict[str, Any]:
    med = statistics.median(c.samples)
    return {
        "name": c.name, "backend": c.backend, "median_s": med, "min_s": min(c.samples), "max_s": max(c.samples),
        "reps": len(c.samples), "inner": c.inner, "first_call_s": c.first_call_s, "flops": c.flops,
        "gflops": c.flops / med / 1e9 if c.flops else None, "samples_per_s": batch / med, "floor": c.floor,
        "samples_s": list(c.samples),
    }
