"""A CUDA emulator for the CPU: fastbp's kernels, compiled as host C++ and run thread by thread.

``compile_module(code, name_expressions)`` turns a CUDA C++ source into a shared library built with g++
(C++20) against ``cuda_shim.h``: every ``__shared__`` declaration is rewritten into a per-block arena
slot, the source's ``#include "..."`` files are inlined (with ``#line`` marks, so errors name the real
file and line), and one C launcher is generated per kernel instantiation. Libraries are cached on disk
by a hash of the whole translation unit, the options and the compiler's version.

``EmulatedKernel.launch(grid, block, args)`` runs a kernel: one fiber per CUDA thread, blocks one after
another, threads in forward, reverse or random order (see cuda_shim.h for what is checked). Arguments
are read as CuPy marshals them (a Python int is a 64-bit integer, a Python float a double, arrays are
pointers) and checked against the kernel's parameter types: a mismatch raises TypeError instead of
handing the kernel garbage. NumPy arrays stand for device memory.

What the emulator cannot show: flush-to-zero (CuPy compiles with ``-ftz=true``), races between blocks,
the memory model, occupancy and speed. nvcc contracts multiply-adds into FMAs; the library is built
with ``-ffp-contract=fast -mfma`` where the CPU has FMA, so contraction happens here too, though not
at the same places: compare floats with tolerances, not bitwise, against other implementations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._cache import cache_root

#: Bumped when the generated code changes in a way the hash of the inputs would not see.
EMULATOR_VERSION = "2"

ORDERS = {"forward": 0, "reverse": 1, "random": 2}

_SHIM = Path(__file__).with_name("cuda_shim.h")


class EmulatorError(RuntimeError):
    """A kernel broke a CUDA rule under the emulator (the message names the block, thread and line)."""


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot run on this machine (the message says why)."""


class EmulatorCompileError(EmulatorUnavailable):
    """g++ rejected the translation unit; the message holds its diagnostics."""


# ---------------------------------------------------------------------------------------------- building
def cache_dir() -> Path:
    """Where compiled kernel libraries are kept: the ``emulator`` folder of fastbp's cache
    ($FASTBP_CACHE_DIR, else the user's cache folder, e.g. ~/.cache/fastbp)."""
    return cache_root() / "emulator"


@functools.cache
def compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler ($CXX, else g++); EmulatorUnavailable when there is none
    or it is older than g++ 12."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise EmulatorUnavailable(f"no C++ compiler: {cxx!r} is not on the PATH (the CUDA emulator needs g++ >= 12)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmulatorUnavailable(f"{path} --version failed: {exc}") from exc
    version = out.splitlines()[0] if out else "unknown"
    if "g++" in version or "GCC" in version:
        major = re.search(r"(\d+)\.\d+\.\d+", version)
        if major and int(major.group(1)) < 12:
            raise EmulatorUnavailable(f"the CUDA emulator needs g++ >= 12 (C++20), found: {version}")
    return path, version


@functools.cache
def _cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " fma " in f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    return False


def compile_options(sanitize: bool = False) -> list[str]:
    """The g++ options of a kernel library. ``sanitize`` builds with AddressSanitizer and UBSan (the
    Python process then needs libasan preloaded; see ``sanitizer_env``)."""
    options = ["-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-Wall",
               "-Wno-unused-function", "-Wno-unused-variable", "-Werror=return-type", "-Werror=uninitialized",
               "-Werror=maybe-uninitialized"]
    if _cpu_has_fma():
        options += ["-mfma", "-ffp-contract=fast"]  # contract multiply-adds, as nvcc does by default
    if sanitize:
        options += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all"]
    else:
        options += ["-O2"]
    return options


def sanitizer_env() -> dict[str, str]:
    """The environment a Python process needs to load sanitized kernel libraries: libasan preloaded,
    leak checks off (the interpreter's own allocations would drown the report). EmulatorUnavailable where
    the compiler has no AddressSanitizer runtime."""
    path, _ = compiler()
    libasan = subprocess.run([path, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        raise EmulatorUnavailable(f"{path} has no AddressSanitizer runtime (libasan.so); on Debian: apt-get install "
                                  "libasan8 (or the libasan of your g++)")
    return {"LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "FASTBP_EMULATOR_SANITIZE": "1"}


def _strip_comments(text: str) -> str:
    """Comments replaced by spaces (newlines kept, so line numbers hold); string literals untouched."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def inline_includes(code: str, name: str, include_dirs: Sequence[str | os.PathLike] = ()) -> str:
    """The source with its includes inlined (``cuda_sources.inline_includes``, the backend's own)."""
    from ..backends.cuda_sources import inline_includes as inline

    try:
        return inline(code, name, include_dirs)
    except FileNotFoundError as exc:
        raise EmulatorCompileError(str(exc)) from exc


_SHARED = re.compile(r"(\bextern\s+)?\b__shared__\b([^;{}]*);")
_ALIGN = re.compile(r"__align__\s*\(\s*(\d+)\s*\)")
_DECL = re.compile(r"\s*(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)", re.S)


def rewrite_shared(code: str) -> str:
    """Each ``__shared__ T name[dims];`` becomes an FBEMU_SHARED slot of the block's arena, each
    ``extern __shared__ T name[];`` the launch's dynamic shared memory. Comments are dropped."""
    code = _strip_comments(code)

    def replace(match: re.Match) -> str:
        extern, decl = match.group(1), match.group(2)
        line = code.count("\n", 0, match.start()) + 1
        newlines = "\n" * match.group(0).count("\n")
        align = 1
        align_match = _ALIGN.search(decl)
        if align_match:
            align = int(align_match.group(1))
            decl = _ALIGN.sub(" ", decl)
        parsed = _DECL.fullmatch(decl)
        depth = 0
        top_level_comma = False
        for ch in decl:
            depth += ch in "<([" and 1 or (ch in ">)]" and -1 or 0)
            top_level_comma |= ch == "," and depth == 0
        if parsed is None or "=" in decl or top_level_comma or not parsed.group("type"):
            raise EmulatorCompileError(f"line {line}: unsupported __shared__ declaration {match.group(0)!r} "
                                       "(one variable per declaration, no initialiser)")
        type_, name, dims = parsed.group("type"), parsed.group("name"), parsed.group("dims").replace(" ", "")
        if extern:
            if dims != "[]":
                raise EmulatorCompileError(f"line {line}: extern __shared__ {name} must be declared as {name}[]")
            return f"FBEMU_EXTERN_SHARED({name}, {type_});{newlines}"
        return f"FBEMU_SHARED({name}, {dims}, {align}, {type_});{newlines}"

    return _SHARED.sub(replace, code)


def translation_unit(code: str, name_expressions: Sequence[str], name: str = "<source>",
                     include_dirs: Sequence[str | os.PathLike] = ()) -> str:
    """The whole C++ source of a kernel library: the shim, the prepared source, the launchers."""
    source = rewrite_shared(inline_includes(code, name, include_dirs))
    lines = ['#line 1 "cuda_shim.h"', _SHIM.read_text(), source, '#line 1 "<fastbp emulator launchers>"']
    for i, expr in enumerate(name_expressions):
        quoted = expr.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(
            f'extern "C" __attribute__((visibility("default"))) int fbemu_launch_{i}(const fbemu::LaunchConfig* c, '
            f'void** a, char* e, std::size_t n) {{ return fbemu::launch(&{expr}, "{quoted}", c, a, e, n); }}')
        lines.append(
            f'extern "C" __attribute__((visibility("default"))) const char* fbemu_signature_{i}() {{ '
            f'static const std::string s = fbemu::signature(&{expr}); return s.c_str(); }}')
    return "\n".join(lines) + "\n"


def build(code: str, name_expressions: Sequence[str], name: str = "<source>",
          include_dirs: Sequence[str | os.PathLike] = (), sanitize: bool | None = None,
          extra_options: Sequence[str] = ()) -> Path:
    """Compile (or find in the cache) the library for ``code``; returns its path. ``extra_options`` go to
    g++ after the usual ones (``-DFBEMU_UCONTEXT`` selects the portable stack switch)."""
    if sanitize is None:
        sanitize = os.environ.get("FASTBP_EMULATOR_SANITIZE") == "1"
    path, version = compiler()
    unit = translation_unit(code, name_expressions, name, include_dirs)
    options = compile_options(sanitize) + list(extra_options)
    key = hashlib.sha256("\0".join([EMULATOR_VERSION, version, *options, unit]).encode()).hexdigest()[:32]
    folder = cache_dir()
    target = folder / f"{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / f"{key}.cpp"
        src.write_text(unit)
        out = Path(tmp) / f"{key}.so"
        result = subprocess.run([path, *options, "-o", str(out), str(src)], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise EmulatorCompileError(f"g++ could not compile {name} for the CUDA emulator:\n"
                                       f"{result.stderr[-6000:]}")
        os.replace(out, target)
    return target


# ---------------------------------------------------------------------------------------------- guarded memory
GUARD_BYTES = 64  # poisoned bytes before and after every guarded allocation
POISON = 0xFF  # NaN in float32 and float64, -1 in signed integers

_guarded: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def guarded_empty(shape: Any, dtype: Any, fill: int | None = POISON) -> np.ndarray:
    """A new array inside a buffer with GUARD_BYTES of POISON on each side; its own bytes are ``fill``
    (POISON by default: reading an element before writing it gives NaN; None leaves them unset). After
    each launch the emulator checks the margins of every guarded argument: a write out of bounds raises
    EmulatorError, a read out of bounds reads NaN."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.empty(nbytes + 2 * GUARD_BYTES, np.uint8)
    buf[:GUARD_BYTES] = POISON
    buf[GUARD_BYTES + nbytes:] = POISON
    if fill is not None:
        buf[GUARD_BYTES:GUARD_BYTES + nbytes] = fill
    _guarded[id(buf)] = buf
    return buf[GUARD_BYTES:GUARD_BYTES + nbytes].view(dtype).reshape(shape)


def guarded_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` in guarded memory."""
    out = guarded_empty(a.shape, a.dtype, fill=None)
    np.copyto(out, a)
    return out


def guard_buffer(a: np.ndarray) -> np.ndarray | None:
    """The guarded buffer ``a`` is a view of, or None."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base if _guarded.get(id(base)) is base else None


def check_guards(a: np.ndarray, what: str) -> None:
    """Raise EmulatorError if the margins around ``a``'s guarded buffer were written (then re-poison them)."""
    buf = guard_buffer(a)
    if buf is None:
        return
    before = bool((buf[:GUARD_BYTES] != POISON).any())
    after = bool((buf[-GUARD_BYTES:] != POISON).any())
    if before or after:
        buf[:GUARD_BYTES] = POISON
        buf[-GUARD_BYTES:] = POISON
        raise EmulatorError(f"{what}: written out of bounds, {'before its start' if before else 'past its end'}")


# ---------------------------------------------------------------------------------------------- launching
class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint64),
                ("order", ctypes.c_int), ("seed", ctypes.c_uint64)]


_CODES = {"b8": np.dtype(np.bool_), "i8": np.dtype(np.int8), "i16": np.dtype(np.int16), "i32": np.dtype(np.int32),
          "i64": np.dtype(np.int64), "u8": np.dtype(np.uint8), "u16": np.dtype(np.uint16),
          "u32": np.dtype(np.uint32), "u64": np.dtype(np.uint64), "f32": np.dtype(np.float32),
          "f64": np.dtype(np.float64)}
_C_NAMES = {"b8": "bool", "i8": "signed char", "i16": "short", "i32": "int", "i64": "long long", "u8": "unsigned char",
            "u16": "unsigned short", "u32": "unsigned int", "u64": "unsigned long long", "f32": "float",
            "f64": "double"}
# the 16-bit storage types of the kernels (common.cuh's bf16 and f16) by their NumPy dtype's name
_CODES["float16"], _C_NAMES["float16"] = np.dtype(np.float16), "f16"
try:
    import ml_dtypes

    _CODES["bfloat16"], _C_NAMES["bfloat16"] = np.dtype(ml_dtypes.bfloat16), "bf16"
except ImportError:  # bfloat16 arrays need ml_dtypes; without it the pointer goes unchecked
    _C_NAMES["bfloat16"] = "bf16"
_CUPY_SCALARS = {np.dtype(c).type for c in "?bhilqBHILQefdFD"}
_PYTHON_SCALARS = {bool: "a Python bool (CuPy passes it as int64)", int: "a Python int (CuPy passes it as int64)",
                   float: "a Python float (CuPy passes it as double)"}


@dataclass(frozen=True)
class Param:
    """One kernel parameter: a pointer to ``code`` elements, or a value of type ``code`` ('v<N>': N bytes of
    anything else)."""

    code: str
    pointer: bool
    const: bool

    @classmethod
    def parse(cls, token: str) -> Param:
        pointer = token.startswith("*")
        body = token[1:] if pointer else token
        const = pointer and body.endswith("c")  # no type code ends in 'c'
        return cls(body[:-1] if const else body, pointer, const)

    @property
    def c_type(self) -> str:
        base = _C_NAMES.get(self.code, f"a {self.code[1:]}-byte type")
        return f"{'const ' if self.const else ''}{base}*" if self.pointer else base


def cupy_scalar(value: Any) -> np.generic:
    """A kernel argument that is not an array, as CuPy passes it: Python int (and bool, an int subclass)
    as int64, float as float64; NumPy scalars as themselves."""
    if type(value) in _CUPY_SCALARS or isinstance(value, np.void):
        return value
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, complex):
        return np.complex128(value)
    raise TypeError(f"CuPy cannot pass a {type(value).__name__} to a kernel")


class EmulatedKernel:
    """One kernel instantiation of an emulated module."""

    def __init__(self, module: EmulatedModule, name: str, launcher: Any, signature: str) -> None:
        self.module = module
        self.name = name
        self._launcher = launcher
        self.params = [Param.parse(t) for t in signature.split(",")] if signature else []

    def __repr__(self) -> str:
        return f"<emulated kernel {self.name}({', '.join(p.c_type for p in self.params)})>"

    def _marshal(self, args: Sequence[Any]) -> tuple[Any, list[Any]]:
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        keep: list[Any] = []
        slots = (ctypes.c_void_p * max(1, len(args)))()
        for i, (param, arg) in enumerate(zip(self.params, args)):
            where = f"{self.name}: argument {i} ({param.c_type})"
            if param.pointer:
                if arg is None:
                    cell = ctypes.c_void_p(0)
                elif isinstance(arg, np.ndarray):
                    if param.code in _CODES and arg.dtype != _CODES[param.code]:
                        raise TypeError(f"{where}: got a {arg.dtype} array; the kernel would read its bytes as "
                                        f"{_C_NAMES[param.code]}")
                    if not arg.flags.c_contiguous:
                        raise TypeError(f"{where}: got a non-contiguous array (strides {arg.strides}); a raw "
                                        "pointer reaches only contiguous memory as the kernel indexes it")
                    if not arg.flags.writeable and not param.const:
                        raise TypeError(f"{where}: got a read-only array for a pointer the kernel may write")
                    cell = ctypes.c_void_p(arg.__array_interface__["data"][0])
                else:
                    raise TypeError(f"{where}: got {type(arg).__name__}, expected an array or None")
                keep.append(cell)
                slots[i] = ctypes.addressof(cell)
            else:
                if isinstance(arg, np.ndarray):
                    raise TypeError(f"{where}: got an array for a value parameter")
                if arg is None:
                    raise TypeError(f"{where}: got None, which CuPy passes as a null pointer")
                value = cupy_scalar(arg)
                if param.code in _CODES:
                    expected = _CODES[param.code]
                    if value.dtype != expected:
                        came = _PYTHON_SCALARS.get(type(arg), f"a {value.dtype} value")
                        raise TypeError(f"{where}: got {came}; pass np.{expected.name}(...)")
                elif value.dtype.itemsize != int(param.code[1:]):
                    raise TypeError(f"{where}: got {value.dtype.itemsize} bytes ({value.dtype}), expected "
                                    f"{param.code[1:]}")
                buf = np.array(value)
                keep.append(buf)
                slots[i] = buf.__array_interface__["data"][0]
        return slots, keep

    def launch(self, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any],
               shared_mem: int = 0, order: str = "forward", seed: int = 0) -> None:
        """Run the kernel over ``grid`` x ``block`` threads; raises EmulatorError on a broken CUDA rule."""
        slots, keep = self._marshal(args)
        config = _LaunchConfig()
        config.grid[:] = _dims(grid, "grid")
        config.block[:] = _dims(block, "block")
        config.shared_mem = int(shared_mem)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
        config.order = ORDERS[order]
        config.seed = int(seed) & (2**64 - 1)
        err = ctypes.create_string_buffer(4096)
        status = self._launcher(ctypes.byref(config), slots, err, ctypes.sizeof(err))
        del keep
        if status != 0:
            raise EmulatorError(err.value.decode(errors="replace"))
        for i, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                check_guards(arg, f"{self.name}: argument {i}")


def _dims(value: int | Sequence[int], what: str) -> list[int]:
    dims = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 non-negative ints, got {value!r}")
    return [int(d) for d in dims] + [1] * (3 - len(dims))


class EmulatedModule:
    """A compiled kernel library: ``get_function(name_expression)`` gives each instantiation."""

    def __init__(self, path: Path, name_expressions: Sequence[str]) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._kernels: dict[str, EmulatedKernel] = {}
        for i, expr in enumerate(name_expressions):
            launcher = getattr(self._lib, f"fbemu_launch_{i}")
            launcher.restype = ctypes.c_int
            launcher.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            sig = getattr(self._lib, f"fbemu_signature_{i}")
            sig.restype = ctypes.c_char_p
            self._kernels[expr] = EmulatedKernel(self, expr, launcher, sig().decode())

    def get_function(self, name: str) -> EmulatedKernel:
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"{name!r} is not among this module's name expressions: {sorted(self._kernels)}") from None

    @property
    def names(self) -> list[str]:
        return list(self._kernels)


@functools.lru_cache(maxsize=64)
def _load(path: Path, names: tuple[str, ...]) -> EmulatedModule:
    return EmulatedModule(path, names)


def compile_module(code: str, name_expressions: Iterable[str], name: str = "<source>",
                   include_dirs: Sequence[str | os.PathLike] = (), sanitize: bool | None = None,
                   extra_options: Sequence[str] = ()) -> EmulatedModule:
    """Build (or load from the cache) the emulated module of a CUDA source and its instantiations."""
    names = tuple(name_expressions)
    path = build(code, names, name, tuple(str(d) for d in include_dirs), sanitize, tuple(extra_options))
    return _load(path, names)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastbp.testing.cuda_emulator --sanitizer-env``: shell exports for a sanitized run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastbp.testing.cuda_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--sanitizer-env", action="store_true",
                        help="print the exports that make kernel libraries build and load with ASan and UBSan")
    args = parser.parse_args(argv)
    if args.sanitizer_env:
        for key, value in sanitizer_env().items():
            print(f"export {key}='{value}'")
        return 0
    path, version = compiler()
    print(f"CUDA emulator {EMULATOR_VERSION}: {path} ({version}); cache {cache_dir()}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

