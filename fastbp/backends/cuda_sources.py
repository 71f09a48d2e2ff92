"""The CUDA sources of the cupy backend: where they are, and every template instantiation they provide.

No CuPy here: the same list drives CuPy's lazy compilation (``RawModule(name_expressions=...)``) and the
nvcc compile check that runs on machines without a GPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..activations import CODES
from ..dtypes import HALF_DTYPES
from ..losses import LOSS_CODES, TARGET_KINDS
from .update_args import STRUCTS, c_struct

#: The C type of each dtype the kernels take: float32 and float64, and the 16-bit types of mixed precision
#: (common.cuh's bf16 and f16 storage types, computed on in float).
DTYPES = {"float32": "float", "float64": "double", "bfloat16": "bf16", "float16": "f16"}
#: The losses of loss.cu's pointwise_loss kernel (its LOSS parameter is their LOSS_CODES code).
POINTWISE_LOSSES = ("binary_cross_entropy", "mse")
_ACTS = sorted(CODES.values())

#: Threads per block of the cupy backend's launches: the grid-stride kernels and the warp-per-row loss
#: kernels. sumsq_partial's shared array is this size.
THREADS = 256
#: ordered_sum, reduce_loss and check_batch_finish run as one block of this many threads (block_sum needs a
#: power of two up to 1024).
REDUCE_THREADS = 1024

#: backward_epilogue's block: 32 columns by 8 row lanes (its shared tile is [8][33]).
COLSUM_BLOCK = (32, 8)
#: Threads per block of mlp.cu's fused training pass (``mlp_fused_pass``).
MLP_THREADS = 128


def _check_block_sizes() -> None:
    # block_sum halves its stride down to 1: a block it reduces must be a power of two, at most 1024
    for name, value in (("THREADS", THREADS), ("REDUCE_THREADS", REDUCE_THREADS)):
        if not (0 < value <= 1024 and value & (value - 1) == 0):
            raise ValueError(f"cuda_sources.{name} must be a power of two up to 1024, got {value}")


_check_block_sizes()


def defines() -> str:
    """The launch sizes as preprocessor definitions, prepended to every source: the kernels size their
    shared arrays from them, so the Python constants and the CUDA arrays cannot drift apart."""
    return f"#define FASTBP_THREADS {THREADS}\n#define FASTBP_REDUCE_THREADS {REDUCE_THREADS}\n"


CODES_HEADER = "codes.cuh"


def _enum(name: str, codes: dict[str, int], prefix: str = "") -> str:
    items = ", ".join(f"{prefix}{key.upper()} = {value}" for key, value in sorted(codes.items(), key=lambda kv: kv[1]))
    return f"enum {name} : int {{ {items} }};\n"


def codes_header() -> str:
    """The text of kernels/codes.cuh, generated from the Python tables, so the kernels and the tables
    cannot disagree: the activation codes (``fastbp.activations.CODES``) and which activations' g' reads
    the pre-activation Z (``keeps == 'preactivation'``), the loss codes (``fastbp.losses.LOSS_CODES``) and the target
    kinds (``TARGET_KINDS``), and the update kernels' argument structures (``update_args.STRUCTS``).
    ``write_codes_header`` writes it; a test fails when the file differs."""
    from ..activations import ACTIVATIONS

    keeps_z = " || ".join(f"ACT == {name.upper()}" for name in sorted(CODES, key=lambda n: CODES[n])
                          if ACTIVATIONS[name].keeps == "preactivation") or "false"
    return (
        "// Generated from fastbp's Python tables by fastbp.backends.cuda_sources.write_codes_header(): do not\n"
        "// edit by hand (tests/test_kernels.py fails when this file and the tables differ).\n"
        "#pragma once\n\n"
        "// Activation codes: fastbp.activations.CODES.\n"
        + _enum("Activation", CODES)
        + "\n// Whether g' reads the pre-activation Z, which the forward pass then keeps\n"
        "// (Activation.keeps == 'preactivation'); for the others g' reads the output A, written over Z.\n"
        f"template <int ACT> constexpr bool keeps_preactivation = {keeps_z};\n\n"
        "// Loss codes: fastbp.losses.LOSS_CODES.\n"
        + _enum("Loss", LOSS_CODES, "LOSS_")
        + "\n// The forms of prepared targets: fastbp.losses.TARGET_KINDS.\n"
        + _enum("TargetKind", {kind: i for i, kind in enumerate(TARGET_KINDS)}, "TARGETS_")
        + "\n// The fused optimizer updates' hyperparameters: fastbp.backends.update_args.STRUCTS.\n"
        + "".join(c_struct(update) for update in STRUCTS)
    )


def write_codes_header(folder: Path | None = None) -> Path:
    """Write kernels/codes.cuh from the Python tables (after adding a built-in activation or loss)."""
    path = (kernel_dir() if folder is None else folder) / CODES_HEADER
    path.write_text(codes_header())
    return path


def launch_threads(name_expression: str) -> int:
    """The most threads per block the cupy backend launches this kernel instantiation with."""
    base = name_expression.split("<")[0]
    if base in ("ordered_sum", "reduce_loss", "check_batch_finish"):
        return REDUCE_THREADS
    if base in ("nonfinite_guard", "loss_scale_update"):
        return 1
    if base == "backward_epilogue":
        return COLSUM_BLOCK[0] * COLSUM_BLOCK[1]
    if base == "mlp_fused_pass":
        return MLP_THREADS
    return THREADS


def kernel_dir() -> Path:
    """The folder holding the .cu files: ``fastbp/kernels`` in an installed wheel, ``kernels/`` at the
    top of the source tree."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "dense.cu").is_file():
            return candidate
    raise FileNotFoundError(f"fastbp's CUDA sources (dense.cu, ...) are in neither {here / 'kernels'} nor "
                            f"{here.parent / 'kernels'}")


def name_expressions(file: str) -> list[str]:
    """Every kernel instantiation that ``file`` provides, as C++ name expressions. The 16-bit types have
    the kernels a mixed-precision step runs on its compute copy: the epilogues, the losses, the batch check,
    the sum of squares and clipping of the gradient, and the updates of float32 parameters from 16-bit
    gradients (``sgd<float, bf16>``); the reductions and the guard run on float32 accumulators."""
    names = []
    for dtype, ctype in DTYPES.items():
        full = dtype not in HALF_DTYPES
        if file == "dense.cu":
            names += [f"forward_epilogue<{ctype}, {a}>" for a in _ACTS]
            names += [f"backward_epilogue<{ctype}, {a}>" for a in _ACTS]
            names.append(f"sum_partials<{ctype}>")
        elif file == "loss.cu":
            names.append(f"softmax_ce<{ctype}>")
            names += [f"reduce_loss<{ctype}>", f"ordered_sum<{ctype}>"] if full else []
            names += [f"pointwise_loss<{ctype}, {LOSS_CODES[loss]}>" for loss in POINTWISE_LOSSES]
            names += [f"check_batch<{ctype}, {kind}>" for kind in range(len(TARGET_KINDS))]
            if ctype == "double":  # the counts are doubles whatever the batch's dtype
                names += [f"check_batch_finish<double, {kind}>" for kind in range(len(TARGET_KINDS))]
        elif file == "optim.cu":
            master = ctype if full else "float"
            names += [f"{update}<{master}, {ctype}>" for update in ("sgd", "adam", "rmsprop")]
            names += [f"sumsq_partial<{ctype}>", f"clip_by_norm<{ctype}>"]
            names += [f"nonfinite_guard<{ctype}>"] if full else [f"scale_by<{ctype}>"]
            names += ["loss_scale_update<float>"] if dtype == "float32" else []
        elif file == "mlp.cu":  # not float16, whose steps scale their loss (layer by layer)
            names += [f"mlp_fused_pass<{ctype}, {a}>" for a in _ACTS] if dtype != "float16" else []
        else:
            raise ValueError(f"unknown kernel file {file!r}")
    return names


FILES = ("dense.cu", "loss.cu", "optim.cu", "mlp.cu")


def instantiation_unit(file: str) -> str:
    """A translation unit that includes ``file`` and instantiates every name expression, for nvcc."""
    path = kernel_dir() / file
    lines = [defines(), f'#include "{path}"', "", "void fastbp_instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in name_expressions(file)]
    lines.append("}")
    return "\n".join(lines) + "\n"


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


def inline_includes(code: str, name: str, include_dirs: Sequence[str | os.PathLike] = (),
                    _seen: set[Path] | None = None) -> str:
    """``code`` with each ``#include "file"`` replaced by that file's text (once per file, as #pragma once
    would), found beside the including file or in ``include_dirs``; ``#line`` marks keep every line's true
    file and number for compiler messages. Raises FileNotFoundError for an include it cannot find."""
    seen = set() if _seen is None else _seen
    here = Path(name).parent if name and not name.startswith("<") else None
    parts = [f'#line 1 "{name}"\n']
    last = 0
    code = _PRAGMA_ONCE.sub("", code)
    for match in _INCLUDE.finditer(code):
        parts.append(code[last:match.start()])
        target = match.group(1)
        candidates = ([here / target] if here else []) + [Path(d) / target for d in include_dirs]
        found = next((c.resolve() for c in candidates if c.is_file()), None)
        if found is None:
            where = [str(c.parent) for c in candidates] or ["(no include directories)"]
            raise FileNotFoundError(f'{name}: #include "{target}" not found in {", ".join(where)}')
        if found not in seen:
            seen.add(found)
            parts.append(inline_includes(found.read_text(), str(found), include_dirs, seen))
        parts.append(f'\n#line {code.count(chr(10), 0, match.end()) + 2} "{name}"')
        last = match.end()
    parts.append(code[last:])
    return "".join(parts)


def source(file: str, folder: Path | None = None) -> str:
    """The self-contained source of ``file`` (its includes inlined) as CuPy compiles it: CuPy's disk cache
    keys on the source text alone, so an edit to an included header must change that text, or CuPy would
    go on loading binaries built from the old header."""
    _check_block_sizes()
    folder = kernel_dir() if folder is None else folder
    path = (folder / file).resolve()
    return defines() + inline_includes(path.read_text(), str(path))

