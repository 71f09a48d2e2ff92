"""The device-compile gate: fastbp's CUDA sources compiled by NVRTC as CuPy compiles them, for real GPU
architectures, with ptxas's resource report read back per kernel.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (the test extra installs it on Linux), a CUDA toolkit,
or ``FASTBP_NVRTC=/path/to/libnvrtc.so``. No GPU is needed. ``python -m fastbp.testing.nvrtc`` prints
the per-kernel table and exits non-zero on any problem.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The architectures every kernel must build for: A100 (sm_80) and H100/H200 (sm_90).
ARCHES = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536
STATIC_SHARED_LIMIT = 48 * 1024  # without the opt-in attribute


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded here (the message says where it looked)."""


class NvrtcError(RuntimeError):
    """NVRTC rejected the source; the message holds its log."""


@dataclass(frozen=True)
class KernelResources:
    """ptxas's report for one kernel instantiation on one architecture."""

    name: str  # the C++ name expression, e.g. 'forward_epilogue<float, 1>'
    arch: str
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared: int  # static shared memory, bytes
    barriers: int


@functools.cache
def library() -> ctypes.CDLL:
    """The NVRTC shared library: $FASTBP_NVRTC, the nvidia-cuda-nvrtc wheel, or the system's."""
    tried = []
    candidates = []
    if os.environ.get("FASTBP_NVRTC"):
        candidates.append(os.environ["FASTBP_NVRTC"])
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += [str(p) for p in sorted(Path(root).glob("cu*/lib/libnvrtc.so*"))]
        candidates += [str(p) for p in sorted(Path(root).glob("cuda_nvrtc/lib/libnvrtc.so*"))]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += [str(p) for p in sorted(Path(home).glob("lib*/libnvrtc.so*"))]
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if "builtins" in os.path.basename(path):
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path} ({exc})")
    raise NvrtcUnavailable("no NVRTC library found: pip install nvidia-cuda-nvrtc (the test extra does), install a "
                           f"CUDA toolkit, or set FASTBP_NVRTC; tried: {tried or 'nothing found'}")


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def cupy_options(include_dirs: Sequence[str | os.PathLike], arch: str) -> list[str]:
    """The options CuPy's RawModule hands NVRTC for fastbp's sources (self-contained: no include directory
    is needed): the backend's own, then CuPy's ``-ftz=true`` and the target architecture; plus ptxas's
    verbose report."""
    return ["--std=c++17", *(f"-I{d}" for d in include_dirs), "-ftz=true", f"--gpu-architecture={arch}",
            "--ptxas-options=-v"]


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def compile_source(source: str, name: str, name_expressions: Sequence[str], include_dirs: Sequence[str | os.PathLike],
                   arch: str) -> list[KernelResources]:
    """Compile ``source`` for ``arch`` with CuPy's options; return each instantiation's resources."""
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "create")
    try:
        for expr in name_expressions:
            _check(lib.nvrtcAddNameExpression(prog, expr.encode()), f"name expression {expr}")
        options = [o.encode() for o in cupy_options(include_dirs, arch)]
        status = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        if status != 0:
            raise NvrtcError(f"NVRTC could not compile {name} for {arch}:\n{text[-6000:]}")
        lowered = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)), f"lowered name of {expr}")
            lowered[out.value.decode()] = expr  # type: ignore[union-attr]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return _parse_report(text, lowered)


def _parse_report(text: str, lowered: dict[str, str]) -> list[KernelResources]:
    found: dict[str, dict[str, int | str]] = {}
    current: dict[str, int | str] | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = found.setdefault(m.group(1), {"arch": m.group(2)})
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), shared=int(m.group(3) or 0))
    missing = sorted(set(lowered.values()) - {lowered[k] for k in found if k in lowered})
    if missing:
        raise NvrtcError(f"ptxas reported nothing for {missing}")
    return [KernelResources(name=lowered[mangled], arch=str(r["arch"]), registers=int(r["registers"]),
                            stack_frame=int(r.get("stack_frame", 0)), spill_stores=int(r.get("spill_stores", 0)),
                            spill_loads=int(r.get("spill_loads", 0)), shared=int(r.get("shared", 0)),
                            barriers=int(r.get("barriers", 0)))
            for mangled, r in found.items() if mangled in lowered]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"NVRTC failed at {what} (nvrtcResult {status})")


def problems(kernel: KernelResources, threads_per_block: int) -> list[str]:
    """What is wrong with a kernel's resources when launched with ``threads_per_block`` threads."""
    out = []
    if kernel.spill_stores or kernel.spill_loads:
        out.append(f"spills registers ({kernel.spill_stores} bytes stored, {kernel.spill_loads} loaded)")
    if kernel.shared > STATIC_SHARED_LIMIT:
        out.append(f"uses {kernel.shared} bytes of static shared memory (over 48 KiB)")
    if kernel.registers * threads_per_block > REGISTERS_PER_SM:
        out.append(f"{kernel.registers} registers x {threads_per_block} threads exceed the {REGISTERS_PER_SM} "
                   "registers of an SM: the launch would fail")
    return out


def check_all(arches: Sequence[str] = ARCHES) -> tuple[list[KernelResources], list[str]]:
    """Every instantiation of every source file on every architecture: (resources, problems)."""
    from ..backends import cuda_sources

    folder = cuda_sources.kernel_dir()
    resources, found = [], []
    for arch in arches:
        for file in cuda_sources.FILES:
            for k in compile_source(cuda_sources.source(file, folder), file, cuda_sources.name_expressions(file),
                                    [], arch):
                resources.append(k)
                threads = cuda_sources.launch_threads(k.name)
                found += [f"{k.name} on {arch}: {p}" for p in problems(k, threads)]
    return resources, found


def table(resources: Sequence[KernelResources]) -> str:
    """The per-kernel resources as a text table, one row per instantiation and architecture."""
    rows = [f"{'kernel':<28} {'arch':<6} {'regs':>4} {'threads':>7} {'smem':>6} {'stack':>5} {'spills':>6}"]
    from ..backends import cuda_sources

    for k in sorted(resources, key=lambda r: (r.arch, r.name)):
        rows.append(f"{k.name:<28} {k.arch:<6} {k.registers:>4} {cuda_sources.launch_threads(k.name):>7} "
                    f"{k.shared:>6} {k.stack_frame:>5} {k.spill_stores + k.spill_loads:>6}")
    return "\n".join(rows)


def main() -> int:
    resources, found = check_all()
    major, minor = version()
    print(f"NVRTC {major}.{minor}, options as CuPy's RawModule: {' '.join(cupy_options([], 'sm_XX'))}")
    print(table(resources))
    for line in found:
        print(f"PROBLEM: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
