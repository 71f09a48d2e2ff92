"""The run of a config (every candidate interleaved), the ratios between its figures, and their tables,
notes and chart."""

from __future__ import annotations

import statistics
from typing import Any

from ..dtypes import HALF_DTYPES
from .candidates import (
    _torch_available,
    _torch_cuda,
    fastbp_candidates,
    floor_candidates,
    naive_candidate,
    torch_candidates,
)
from .timing import Candidate, run_interleaved, summarize


def run_config(config: str, sizes: list[int], batch: int, backends: list[Any], dtypes: list[str],
               reps: int, min_time: float, peers: bool = True, torch_compile: bool = False,
               ops: bool = True, settle: float = 0.25, tf32: bool = False,
               epilogues: str = "kernels", fused_mlp: bool = False) -> list[dict[str, Any]]:
    """Time every candidate of one config; returns the result rows with their ratios. ``tf32``,
    ``epilogues`` and ``fused_mlp`` (the GPU backends' settings, made by the caller) go into the rows' dtype
    label."""
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        groups: list[tuple[str, list[Candidate]]] = []
        extra: dict[str, dict[str, Any]] = {}
        for bk in backends:
            cands, info = fastbp_candidates(bk, sizes, batch, dtype, ops=ops)
            groups.append((bk.name, cands))
            extra[bk.name] = info
        groups.append(("floors", floor_candidates(backends, sizes, batch, dtype)))
        peer_cands: list[Candidate] = []
        on_cpu = any(bk.name != "cupy" for bk in backends) and dtype not in HALF_DTYPES  # 16 bits: GPUs alone
        on_gpu = any(bk.name == "cupy" for bk in backends)
        if peers:
            if on_cpu:
                peer_cands.append(naive_candidate(sizes, batch, dtype))
            if _torch_available():
                devices = (["cpu"] if on_cpu else []) + (["cuda"] if on_gpu and _torch_cuda() else [])
                for device in devices:
                    peer_cands += torch_candidates(sizes, batch, dtype, device)
                    if torch_compile:
                        peer_cands += torch_candidates(sizes, batch, dtype, device, compile_model=True)
        everything = [c for _, cs in groups for c in cs] + peer_cands
        run_interleaved(everything, reps, min_time, settle)
        label = (f"{dtype}+tf32" if tf32 and dtype == "float32" else dtype) + (
            f"+{epilogues}" if epilogues != "kernels" else "") + ("+fused" if fused_mlp else "")
        summaries = [dict(summarize(c, batch), config=config, dtype=label, sizes=sizes, batch=batch,
                          **extra.get(c.backend, {})) for c in everything]
        rows += add_ratios(summaries)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add, for one config and dtype: ratio_to_floor (this time over its floor: on the CPU the fastest
    BLAS library's, named in floor_library, with the ratio to every library's in ratio_to_floors; on a
    GPU its backend's own), speedup_vs_naive and speedup_vs_torch (the peer's time over this time).

    Each ratio is the median of the per-round ratios where both rows carry their interleaved samples
    (a round times every candidate once, so a slow moment of the machine hits both sides of a ratio
    alike), else the ratio of the medians. ratio_to_floor_iqr is the 25th-75th percentile of the
    per-round ratios to the floor: how far the ratio moved during the run."""
    by_key = {(r["backend"], r["name"]): r for r in rows}
    cpu_floors: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["backend"].startswith("blas:"):
            cpu_floors.setdefault(r["name"], []).append(r)
    for r in rows:
        floor, others = None, []
        if r.get("floor"):
            name = f"floor:{r['floor']}"
            if r["backend"] == "cupy" or r["backend"].startswith("torch-cuda"):
                floor = by_key.get((r["backend"], name))
            elif cpu_floors.get(name):
                others = cpu_floors[name]
                floor = min(others, key=lambda f: f["median_s"])
        r["ratio_to_floor"] = _ratio(r, floor) if floor else None
        r["ratio_to_floor_iqr"] = _paired_quartiles(r, floor) if floor else None
        r["floor_library"] = floor["backend"] if floor else None
        r["ratio_to_floors"] = {f["backend"]: _ratio(r, f) for f in others} or None
        naive = by_key.get(("numpy-naive", "step_sgd"))
        r["speedup_vs_naive"] = (_ratio(naive, r)
                                 if naive and r["name"] == "step_sgd" and r["backend"] != "numpy-naive" else None)
        # a graph replay's peer is PyTorch's eager step of the same optimizer
        torch_peer = by_key.get(("torch-cuda" if r["backend"] == "cupy" else "torch-cpu",
                                 r["name"].removeprefix("graph:")))
        r["speedup_vs_torch"] = (_ratio(torch_peer, r)
                                 if torch_peer and not r["backend"].startswith("torch") else None)
    return rows


def _per_round(a: dict[str, Any], b: dict[str, Any]) -> list[float] | None:
    sa, sb = a.get("samples_s"), b.get("samples_s")
    if not sa or not sb or len(sa) != len(sb):
        return None
    return [x / y for x, y in zip(sa, sb)]


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a's time over b's: the median of the per-round ratios, or the ratio of medians without samples."""
    ratios = _per_round(a, b)
    return statistics.median(ratios) if ratios else a["median_s"] / b["median_s"]


def _paired_quartiles(row: dict[str, Any], base: dict[str, Any]) -> list[float] | None:
    """The 25th and 75th percentiles of row's time over base's, round by round."""
    ratios = _per_round(row, base)
    if not ratios or len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return [q[0], q[2]]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'config':7s} {'dtype':7s} {'backend':18s} {'measure':18s} {'median ms':>10s} {'min-max ms':>17s} "
            f"{'samples/s':>10s} {'GFLOP/s':>8s} {'x floor (IQR)':>20s} {'vs naive':>8s} {'vs torch':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"
        lines.append(
            f"{r['config']:7s} {r['dtype']:7s} {r['backend']:18s} {r['name']:18s} {r['median_s'] * 1e3:10.3f} "
            f"{r['min_s'] * 1e3:8.3f}-{r['max_s'] * 1e3:<8.3f} {r['samples_per_s']:10.0f} "
            f"{fmt(r['gflops'], '8.1f')} {_ratio_cell(r):>20s} {fmt(r['speedup_vs_naive'], '8.2f')} "
            f"{fmt(r['speedup_vs_torch'], '8.2f')}")
    import importlib.util

    notes = floor_notes(rows) + table_notes(rows, importlib.util.find_spec("torch") is not None)
    return "\n".join(lines + ([""] + notes if notes else []))


def floor_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Per config and dtype, the CPU floors of each BLAS library: which one is the 'x floor' column's base
    (the fastest), and the public SGD step's ratio to each."""
    notes = []
    for key in dict.fromkeys((r["config"], r["dtype"]) for r in rows):
        floors = [r for r in rows if (r["config"], r["dtype"]) == key and r["backend"].startswith("blas:")
                  and r["name"] == "floor:step"]
        if not floors:
            continue
        fastest = min(floors, key=lambda f: f["median_s"])
        text = ", ".join(f"{f['backend'][5:]} {f['median_s'] * 1e3:.3f}" for f in floors)
        notes.append(f"{key[0]} {key[1]}: CPU GEMM floors of the step (median ms): {text}; "
                     f"x floor is against the fastest, {fastest['backend'][5:]}")
        for r in rows:
            if (r["config"], r["dtype"]) == key and r["name"] == "step_sgd" and r.get("ratio_to_floors") \
                    and not r["backend"].startswith(("torch", "numpy-naive")):
                each = ", ".join(f"{lib[5:]} {v:.3f}" for lib, v in r["ratio_to_floors"].items())
                notes.append(f"  {r['backend']} step_sgd x each floor: {each}")
    return notes


def table_notes(rows: list[dict[str, Any]], torch_installed: bool) -> list[str]:
    """What a reader of the table must know: a time below its GEMM floor (which only a busy or noisy
    machine produces, the floor being part of the step; but a step or forward pass split into parts run
    side by side, ``step_route`` and ``forward_route``, does its products side by side too), and why the
    torch column is empty."""
    notes = []
    below, split = [], set()
    for r in rows:
        if r.get("ratio_to_floor") is None or r["ratio_to_floor"] >= 1.0:
            continue
        if "split" in r.get("step_route", "") and r["name"].split(":")[-1].startswith("step"):
            split.add(f"{r['config']} {r['dtype']} {r['backend']}")
        elif "split" in r.get("forward_route", "") and r["name"] == "forward":
            split.add(f"{r['config']} {r['dtype']} {r['backend']} forward")
        else:
            below.append(r)
    if below:
        names = ", ".join(sorted({f"{r['config']} {r['backend']} {r['name']}" for r in below})[:4])
        notes.append(f"warning: {len(below)} rows ran below their GEMM floor (x floor < 1.0: {names}); the floor "
                     f"is part of each step, so the machine was busy or the timings noisy: rerun on a quiet "
                     f"machine, with more --reps")
    if split:
        notes.append(f"below the floor by design: {', '.join(sorted(split))}: the step (or forward pass) splits "
                     f"the batch into parts run side by side on Numba's threads, while the floor runs each product "
                     f"on BLAS's threads, one after the other")
    if not torch_installed:
        notes.append("vs torch: '-' because PyTorch is not installed (pip install torch to compare)")
    return notes


def _ratio_cell(r: dict[str, Any]) -> str:
    if r.get("ratio_to_floor") is None:
        return "-"
    iqr = r.get("ratio_to_floor_iqr")
    return f"{r['ratio_to_floor']:.3f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def format_latency(rows: list[dict[str, Any]]) -> str:
    """JIT compile time (a backend's warmup) and the first step's latency, apart from steady state."""
    lines = ["compile and first-call latency (not in the figures above), peak host memory of model + step:"]
    for r in rows:
        if r["name"] != "step_sgd" or r["backend"].startswith(("torch", "numpy-naive")):
            continue
        compile_s = f"compile {r['compile_s']:.2f} s, " if r.get("compile_s") is not None else ""
        peak = f", peak host memory {r['peak_mem_bytes_sgd'] / 2**20:.1f} MiB" if "peak_mem_bytes_sgd" in r else ""
        if r.get("device_mem_bytes_sgd") is not None:
            peak += f", device pool {r['device_mem_bytes_sgd'] / 2**20:.1f} MiB"
        route = f"; step: {r['step_route']}" if r.get("step_route") else ""
        route += f"; forward: {r['forward_route']}" if r.get("forward_route") else ""
        lines.append(f"  {r['config']:7s} {r['dtype']:7s} {r['backend']:8s} {compile_s}first step "
                     f"{r['first_call_s'] * 1e3:.1f} ms (steady {r['median_s'] * 1e3:.3f} ms){peak}{route}")
    return "\n".join(lines)


def warnings_for(env: dict[str, Any]) -> list[str]:
    warns = []
    if env["env"].get("OPENBLAS_CORETYPE"):
        warns.append(f"OPENBLAS_CORETYPE={env['env']['OPENBLAS_CORETYPE']} is set: it forces that OpenBLAS kernel "
                     "instead of the best one for this CPU, which slows BLAS and makes timings erratic. Run "
                     "benchmarks as `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE fastbp bench ...`.")
    if env["env"].get("OPENBLAS_L2_SIZE"):
        warns.append(f"OPENBLAS_L2_SIZE={env['env']['OPENBLAS_L2_SIZE']} is set: it overrides OpenBLAS's cache "
                     "blocking; unset it for benchmarks.")
    if not env["blas"]:
        warns.append("threadpoolctl is not installed: the BLAS library and kernel are not reported "
                     "(pip install 'fastbp[bench]').")
    return warns


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """A bar chart of each step's and forward's ratio to its GEMM floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio_to_floor"] is not None and not r["name"].startswith("op:")]
    labels = [f"{r['config']}/{r['dtype'][5:]}\n{r['backend']}\n{r['name']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(shown)), 4.5))
    ax.bar(range(len(shown)), [r["ratio_to_floor"] for r in shown], color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("time / GEMM floor (lower is better)")
    ax.set_title("fastbp bench: step and forward time relative to the GEMM floor")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
