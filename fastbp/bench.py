"""``fastbp bench``: placeholder until the benchmark harness lands (issue 3)."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub: Any) -> None:
    sub.add_parser("bench", help="benchmark training steps against the GEMM floor")


def cmd_bench(args: argparse.Namespace) -> int:
    raise ValueError("fastbp bench is not implemented yet")
