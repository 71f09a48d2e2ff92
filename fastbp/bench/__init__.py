"""``fastbp bench``: training-step speed against the GEMM floor, a naive NumPy step and PyTorch.

Every figure is a median over interleaved repetitions (rounds): each round times every candidate once,
in turn, so a slow moment of a shared machine hits all of them alike. Ratios are medians of the per-round
ratios between figures of the same run.

The GEMM floor (DESIGN section 1) is the time of exactly the step's matrix products, with the same
library, dtype and operand layouts as the step, called one by one: forward X W per layer; backward
A_prev^T delta per layer and delta W^T for every layer but the first. No implementation of the same math
can train the step faster.
"""

from __future__ import annotations

from .candidates import (
    _op_candidates,
    _torch_available,
    _torch_cuda,
    fastbp_candidates,
    floor_candidates,
    gemm_operands,
    naive_candidate,
    naive_numpy_step,
    torch_candidates,
)
from .cli import add_bench_parser, cmd_bench
from .flops import CONFIGS, LR, backward_flops, forward_flops, gemm_flops, gemm_list, step_flops
from .report import (
    add_ratios,
    floor_notes,
    format_latency,
    format_table,
    plot,
    run_config,
    table_notes,
    warnings_for,
)
from .timing import Candidate, run_interleaved, summarize

__all__ = ["CONFIGS", "LR", "Candidate", "gemm_list", "gemm_flops", "step_flops", "forward_flops", "backward_flops",
           "add_ratios", "run_config", "format_table", "floor_notes", "table_notes", "format_latency", "plot",
           "warnings_for", "naive_numpy_step", "naive_candidate", "torch_candidates", "fastbp_candidates",
           "floor_candidates", "gemm_operands", "run_interleaved", "summarize", "add_bench_parser", "cmd_bench",
           "_op_candidates", "_torch_available", "_torch_cuda"]
