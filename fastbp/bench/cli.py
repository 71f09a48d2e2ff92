"""``fastbp bench``'s command line."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from ..dtypes import HALF_DTYPES
from .candidates import _torch_available
from .flops import CONFIGS
from .report import format_latency, format_table, plot, run_config, warnings_for


def add_bench_parser(sub: Any, sizes_type: Callable[[str], list[int]]) -> None:
    p = sub.add_parser("bench", help="benchmark training steps against the GEMM floor and PyTorch")
    p.add_argument("--config", action="append", choices=sorted(CONFIGS),
                   help="named config (repeatable); default: small and mnist (+ large, narrow on a GPU)")
    p.add_argument("--sizes", type=sizes_type, help="custom layer sizes, e.g. 784,512,10 (with --batch)")
    p.add_argument("--batch", type=int, help="custom batch size")
    p.add_argument("--backend", action="append", help="backend (repeatable); default: every available one")
    p.add_argument("--dtype", action="append", choices=("float32", "float64", "bfloat16", "float16"),
                   help="default: float32; bfloat16 and float16 are mixed precision (float32 master weights; "
                        "cupy alone), against PyTorch under autocast")
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per timed sample (default 0.02)")
    p.add_argument("--settle", type=float, default=0.25,
                   help="pause between libraries' thread pools, seconds (default 0.25)")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op split")
    p.add_argument("--no-peers", action="store_true", help="skip the naive NumPy step and PyTorch")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile'd PyTorch")
    p.add_argument("--tf32", action="store_true",
                   help="float32 GEMMs on TF32 tensor cores (cupy and torch-cuda; the floor too)")
    p.add_argument("--epilogues", choices=("kernels", "cublaslt"), default="kernels",
                   help="the cupy backend's work around its GEMMs: fastbp's kernels, or fused by cuBLASLt")
    p.add_argument("--fused-mlp", action="store_true",
                   help="the cupy backend's steps with forward and backward in one kernel where the network allows")
    p.add_argument("--json", metavar="FILE", help="write every figure and the environment as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a PNG chart of the ratios to the floor")


def cmd_bench(args: argparse.Namespace) -> int:
    import fastbp as fb

    from ..envinfo import environment, format_environment

    if args.reps < 1 or args.min_time <= 0:
        raise ValueError(f"--reps must be >= 1 and --min-time > 0, got {args.reps} and {args.min_time}")
    names = args.backend or fb.available_backends()
    backends = [fb.backends.resolve_backend(n) for n in names]
    on_gpu = any(bk.name == "cupy" for bk in backends)
    configs: list[tuple[str, list[int], int]] = []
    if args.sizes or args.batch:
        if not (args.sizes and args.batch):
            raise ValueError("--sizes and --batch go together")
        if len(args.sizes) < 2 or args.batch < 1:
            raise ValueError(f"--sizes needs >= 2 widths and --batch > 0, got {args.sizes} and {args.batch}")
        configs.append(("custom", args.sizes, args.batch))
    chosen = args.config or ([] if configs else ["small", "mnist"] + (["large", "narrow"] if on_gpu else []))
    for name in chosen:
        cfg = CONFIGS[name]
        if cfg.get("gpu_only") and not on_gpu:
            raise ValueError(f"config {name!r} is sized for a GPU; run it with the cupy backend")
        configs.append((name, cfg["sizes"], cfg["batch"]))
    dtypes = args.dtype or ["float32"]
    for half in HALF_DTYPES:
        if half in dtypes and any(half not in bk.compute_dtypes for bk in backends):
            raise ValueError(f"--dtype {half} (mixed precision) runs on the cupy backend: add --backend cupy")
    if args.tf32:
        if not on_gpu:
            raise ValueError("--tf32 needs the cupy backend")
        for bk in backends:
            if hasattr(bk, "set_tf32"):
                bk.set_tf32(True)
        if _torch_available():
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True

    if args.epilogues != "kernels":
        gpus = [bk for bk in backends if hasattr(bk, "set_epilogues")]
        if not gpus:
            raise ValueError(f"--epilogues {args.epilogues} needs the cupy backend")
        for bk in gpus:
            bk.set_epilogues(args.epilogues)

    if args.fused_mlp:
        fused = [bk for bk in backends if hasattr(bk, "set_fused_mlp")]
        if not fused:
            raise ValueError("--fused-mlp needs the cupy backend")
        for bk in fused:
            bk.set_fused_mlp(True)

    if any(bk.name == "numba" for bk in backends):
        from ..backends import _numba_blas, numba_backend

        if numba_backend.SPLIT != "never":  # as the numba step's first split would, before anything is timed,
            _numba_blas.quiet_pool()  # so that every library's timings run with the same OpenBLAS threads
    env = environment()
    print(format_environment(env))
    warns = warnings_for(env)
    for w in warns:
        print(f"warning: {w}")
    rows: list[dict[str, Any]] = []
    for name, sizes, batch in configs:
        print(f"\nconfig {name}: sizes {sizes}, batch {batch}, dtypes {dtypes}, backends {names} ...", flush=True)
        rows += run_config(name, sizes, batch, backends, dtypes, args.reps, args.min_time,
                           peers=not args.no_peers, torch_compile=args.torch_compile, ops=not args.no_ops,
                           settle=args.settle, tf32=args.tf32, epilogues=args.epilogues, fused_mlp=args.fused_mlp)
    print()
    print(format_table(rows))
    print()
    print(format_latency(rows))
    if args.json:
        payload = {"schema": "fastbp-bench/1", "command": "fastbp bench", "argv": vars(args),
                   "environment": env, "warnings": warns, "results": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"\nwrote {os.path.abspath(args.json)}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {os.path.abspath(args.plot)}")
    return 0
