"""The FLOP model of a training step: its GEMMs (the floor's products) and their counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Named configs: layer sizes (input first) and batch. GPU-only configs are run only on a GPU backend.
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"sizes": [64, 128, 128, 10], "batch": 64},
    "mnist": {"sizes": [784, 1024, 1024, 10], "batch": 256},
    "wide": {"sizes": [2048, 2048, 2048, 2048, 2048], "batch": 1024},
    "large": {"sizes": [4096, 4096, 4096, 4096, 4096], "batch": 8192, "gpu_only": True},
    "narrow": {"sizes": [64, 64, 64, 64, 64, 10], "batch": 65536, "gpu_only": True},
}

#: The learning rate of every timed step.
LR = 1e-3


def gemm_list(sizes: Sequence[int], batch: int) -> list[dict[str, Any]]:
    """The matrix products of one training step, per layer, as (m, k, n) with their role.

    Layer l (1-based) maps n_{l-1} -> n_l. Forward: (B, n_{l-1}) @ (n_{l-1}, n_l). Backward: the weight
    gradient (n_{l-1}, B) @ (B, n_l) for every layer, and the input gradient (B, n_l) @ (n_l, n_{l-1})
    for every layer but the first, whose input needs no gradient.
    """
    gemms = []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        gemms.append({"layer": l, "role": "forward", "m": batch, "k": n_in, "n": n_out})
        gemms.append({"layer": l, "role": "weight_grad", "m": n_in, "k": batch, "n": n_out})
        if l > 1:
            gemms.append({"layer": l, "role": "input_grad", "m": batch, "k": n_out, "n": n_in})
    return gemms


def gemm_flops(g: dict[str, Any]) -> int:
    return 2 * g["m"] * g["k"] * g["n"]


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """FLOPs of one training step: 6 B n_in n_out per layer, 4 B n_in n_out for the first."""
    return sum(gemm_flops(g) for g in gemm_list(sizes, batch))


def forward_flops(sizes: Sequence[int], batch: int) -> int:
    return sum(2 * batch * a * b for a, b in zip(sizes[:-1], sizes[1:]))


def backward_flops(sizes: Sequence[int], batch: int) -> int:
    return step_flops(sizes, batch) - forward_flops(sizes, batch)
