"""An emulated CuPy: enough of the ``cupy`` module for fastbp's cupy backend to run its own code,
unchanged, on the CPU.

Device arrays are NumPy arrays in host memory behind a CuPy-like ``ndarray`` that behaves as CuPy's does
where it matters for finding GPU bugs:

- no implicit host conversion: ``np.asarray(device_array)`` raises TypeError, as do operations that mix
  device and host arrays; ``get()``, ``float()``, ``bool()`` and ``item()`` are device-to-host reads and
  are counted (``stats``);
- each array lives on a device; using it while another device is current raises, as CuPy does where
  peer access is unavailable;
- ``empty`` memory is filled with 0xFF bytes (NaN in float), and every allocation has poisoned margins
  that the emulator checks after each kernel launch (``cuda_emulator.guarded_empty``), so a read before
  a write or past the end gives NaN and a write past the end raises;
- ``RawModule`` compiles with fastbp's CUDA emulator (``cuda_emulator``) and launches run every CUDA
  thread, in random order by default, with CuPy's argument marshalling and a check of each argument
  against the kernel's parameter types;
- ``matmul`` is NumPy's, with TF32 rounding of float32 inputs when the cuBLAS compute type is TF32;
- the memory pool counts bytes in use and allocations, and raises OutOfMemoryError past the device size.

Only tests select it (``fastbp.testing.emulated_cupy``): it is never listed by available_backends().
"""

from __future__ import annotations

import builtins
import collections
import itertools
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cuda_emulator

__version__ = "14.0.0+fastbp.emulated"


@dataclass
class Settings:
    """What the emulated devices look like and how kernels run."""

    order: str = "random"  # thread order of kernel launches: 'forward', 'reverse' or 'random'
    device_count: int = 2
    memory_bytes: int = 80 * 2**30  # per device, as an H100
    sm_count: int = 132
    compute_capability: str = "90"


@dataclass
class Stats:
    """Counts since the last ``reset()``: device-to-host reads, host-to-device copies, syncs, launches."""

    device_to_host: int = 0
    host_to_device: int = 0
    synchronize: int = 0
    launches: int = 0
    graph_launches: int = 0
    device_switches: int = 0  # entering or leaving a Device context that changes the current device
    kernels: collections.Counter[str] = field(default_factory=collections.Counter)  # launches per kernel

    def reset(self) -> None:
        self.device_to_host = self.host_to_device = self.synchronize = self.launches = self.device_switches = 0
        self.graph_launches = 0
        self.kernels.clear()


settings = Settings()
stats = Stats()
_seeds = itertools.count(1)
_local = threading.local()


def _current_device_id() -> int:
    stack = getattr(_local, "devices", None)
    return stack[-1] if stack else 0


# ------------------------------------------------------------------------------------------------ errors
class CUDARuntimeError(RuntimeError):
    pass


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")
        self.size, self.total, self.limit = size, total, limit


# ------------------------------------------------------------------------------------------------ memory
class MemoryPool:
    """Bytes in use on each device and the number of allocations (CuPy's pool caches freed blocks; this
    one frees them at once, so ``total_bytes() == used_bytes()``)."""

    def __init__(self) -> None:
        self._used = [0] * 16
        self.malloc_count = 0

    def _allocated(self, device: int, nbytes: int) -> None:
        self._used[device] += nbytes
        self.malloc_count += 1

    def _freed(self, device: int, nbytes: int) -> None:
        self._used[device] -= nbytes

    def used_bytes(self) -> int:
        return self._used[_current_device_id()]

    def total_bytes(self) -> int:
        return self.used_bytes()

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream: Any = None) -> None:
        pass

    def n_free_blocks(self) -> int:
        return 0

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        settings.memory_bytes = int(size if size is not None else (fraction or 1.0) * settings.memory_bytes)


_pool = MemoryPool()
_allocations: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def get_default_memory_pool() -> MemoryPool:
    return _pool


def _allocate(shape: Any, dtype: Any, fill: int | None = cuda_emulator.POISON) -> ndarray:
    """A new device array in guarded memory (see cuda_emulator.guarded_empty); ``fill`` is the byte its data
    starts as (None: the caller writes every element)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if builtins.any(s < 0 for s in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    _not_in_capture(f"an allocation of {nbytes} bytes")
    device = _current_device_id()
    if nbytes + _pool._used[device] > settings.memory_bytes:
        raise OutOfMemoryError(nbytes, _pool._used[device], settings.memory_bytes)
    data = cuda_emulator.guarded_empty(shape, dtype, fill)
    _pool._allocated(device, nbytes)
    weakref.finalize(cuda_emulator.guard_buffer(data), _pool._freed, device, nbytes)
    return ndarray._wrap(data, device)


# ------------------------------------------------------------------------------------------------ devices
class Device:
    """A CUDA device; ``with Device(n):`` makes it current for the block (this thread only)."""

    def __init__(self, device: int | None = None) -> None:
        device = _current_device_id() if device is None else int(device)
        if not 0 <= device < settings.device_count:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        self.id = device

    def __enter__(self) -> Device:
        if not hasattr(_local, "devices"):
            _local.devices = []
        stats.device_switches += _current_device_id() != self.id
        _local.devices.append(self.id)
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.devices.pop()
        stats.device_switches += _current_device_id() != self.id

    def use(self) -> None:
        if not hasattr(_local, "devices"):
            _local.devices = []
        if _local.devices:
            _local.devices[-1] = self.id
        else:
            _local.devices.append(self.id)

    def synchronize(self) -> None:
        stats.synchronize += 1

    @property
    def attributes(self) -> dict[str, int]:
        return {"MultiProcessorCount": settings.sm_count, "MaxThreadsPerBlock": 1024, "WarpSize": 32,
                "MaxSharedMemoryPerBlock": 48 * 1024, "MaxSharedMemoryPerBlockOptin": 227 * 1024,
                "MaxSharedMemoryPerMultiprocessor": 228 * 1024}

    @property
    def compute_capability(self) -> str:
        return settings.compute_capability

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("device", self.id))

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (emulated)>"


def _check_device(device: int, what: str = "array") -> None:
    current = _current_device_id()
    if device != current:
        raise ValueError(f"The device where the {what} resides ({device}) is different from the current device "
                         f"({current}). Peer access is unavailable between these devices.")


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr = 0

    def synchronize(self) -> None:
        _not_in_capture("a stream synchronize")
        stats.synchronize += 1

    # -- stream capture, as CUDA graphs record it: between begin_capture and end_capture kernel launches are
    # recorded, not run, and Graph.launch runs them in order on what the arrays then hold. Anything else
    # that would touch device memory (an elementwise op, a copy, an allocation, a read) raises, as the
    # emulator cannot defer it: a step that captures here is kernel launches (and what ``record`` adds) alone.
    def begin_capture(self, mode: Any = None) -> None:
        global _capture
        if _capture is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: a capture is in progress")
        _capture = []

    def end_capture(self) -> Graph:
        global _capture
        if _capture is None:
            raise CUDARuntimeError("cudaErrorIllegalState: no capture is in progress")
        ops, _capture = _capture, None
        return Graph(ops)

    def is_capturing(self) -> bool:
        return _capture is not None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_null_stream = Stream(null=True)
_capture: list[Any] | None = None  # the launches of the capture in progress


class Graph:
    """A captured sequence of launches; ``launch`` runs them in order."""

    def __init__(self, ops: list[Any]) -> None:
        self._ops = ops

    def launch(self, stream: Any = None) -> None:
        _not_in_capture("a graph launch")
        for op in self._ops:
            op()
        stats.graph_launches += 1


def record(op: Any) -> None:
    """Run ``op()`` now, or during a capture add it to the graph (for work done outside a kernel, such as a
    test's stand-in for cuBLAS)."""
    if _capture is not None:
        _capture.append(op)
    else:
        op()


def _not_in_capture(what: str) -> None:
    if _capture is not None:
        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} during stream capture (the emulated CuPy "
                               "captures kernel launches alone)")


def get_current_stream() -> Stream:
    return _null_stream


# ------------------------------------------------------------------------------------------------ arrays
def _host(x: Any, what: str = "operand") -> Any:
    """The NumPy view of a device array (checked to be on the current device); scalars as they are;
    host arrays refused, as CuPy refuses them."""
    if isinstance(x, ndarray):
        _check_device(x._device)
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a NumPy array cannot be used as a CuPy {what} "
                        "(copy it to the device with cupy.asarray first)")
    if isinstance(x, (list, tuple)):
        return type(x)(_host(v, what) for v in x)
    return x


def _wrap_result(r: Any, device: int | None = None) -> Any:
    device = _current_device_id() if device is None else device
    if isinstance(r, np.ndarray):
        if r.base is None and r.nbytes:
            _pool._allocated(device, r.nbytes)
            weakref.finalize(r, _pool._freed, device, r.nbytes)
        return ndarray._wrap(r, device)
    if isinstance(r, np.generic):  # CuPy returns 0-d arrays, never scalars
        return _wrap_result(np.asarray(r), device)
    if isinstance(r, tuple):
        return tuple(_wrap_result(v, device) for v in r)
    return r


def _apply(fn: Any, args: tuple, kwargs: dict) -> Any:
    _not_in_capture(f"{getattr(fn, '__name__', fn)}")
    args = tuple(_host(a) for a in args)
    out = kwargs.get("out")
    kwargs = {k: _host(v) for k, v in kwargs.items()}
    with np.errstate(all="ignore"):  # CuPy never warns about overflow or invalid values
        result = fn(*args, **kwargs)
    if out is not None and isinstance(out, ndarray) and result is out._a:
        return out
    return _wrap_result(result)


class _Pointer:
    """CuPy's MemoryPointer, as far as fastbp reads it: the address and the device number."""

    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr = ptr
        self.device_id = device_id


class ndarray:  # noqa: N801 - CuPy's name
    """A device array of the emulated CuPy (a NumPy array in host memory)."""

    __slots__ = ("_a", "_device", "__weakref__")
    __array_priority__ = 100

    _a: np.ndarray
    _device: int

    def __init__(self, shape: Any, dtype: Any = float) -> None:
        new = _allocate(shape, dtype)
        self._a, self._device = new._a, new._device

    @classmethod
    def _wrap(cls, a: np.ndarray, device: int) -> ndarray:
        obj = object.__new__(cls)
        obj._a = a
        obj._device = device
        return obj

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: Device(self._device))
    data = property(lambda self: _Pointer(self._a.__array_interface__["data"][0], self._device))
    T = property(lambda self: ndarray._wrap(self._a.T, self._device))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self._a.__array_interface__["data"][0], False),
                "version": 3, "strides": None if self._a.flags.c_contiguous else self.strides}

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _apply(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        if func.__name__ not in _FUNCTIONS:
            return NotImplemented
        return _apply(func, args, kwargs)

    # -- host reads
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        # CuPy copies from the array's own device, whichever is current; into ``out`` when given (a host
        # array of the same shape and dtype, as CuPy requires)
        _not_in_capture("a device-to-host copy")
        stats.device_to_host += 1
        if out is None:
            return np.array(self._a, order=order, copy=True)  # type: ignore[call-overload]
        if not isinstance(out, np.ndarray) or out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError("Shape mismatch or dtype mismatch between out and the array")
        np.copyto(out, self._a)
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Copy the host array ``arr`` (same shape and dtype) into this array, as CuPy's set."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape mismatch or dtype mismatch")
        _not_in_capture("a host-to-device copy")
        stats.host_to_device += 1
        np.copyto(self._a, arr)

    def _scalar(self) -> Any:
        if self.size != 1:
            raise ValueError("only size-1 arrays can be converted to Python scalars")
        _not_in_capture("a device-to-host read")
        stats.device_to_host += 1
        return self._a.reshape(()).item()

    def item(self) -> Any:
        return self._scalar()

    def tolist(self) -> Any:
        return self.get().tolist()

    def __float__(self) -> float:
        return float(self._scalar())

    def __int__(self) -> int:
        return int(self._scalar())

    def __index__(self) -> int:
        if self.dtype.kind not in "iub":
            raise TypeError("only integer arrays can be used as an index")
        return int(self._scalar())

    def __bool__(self) -> bool:
        return bool(self._scalar())

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"array({np.array2string(self._a, separator=', ')}, device={self._device}, emulated)"

    __hash__ = None  # type: ignore[assignment]

    # -- views, copies, element access
    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _wrap_result(self._a.reshape(shape, order=order), self._device)  # type: ignore[call-overload]

    def ravel(self, order: str = "C") -> ndarray:
        return _wrap_result(self._a.ravel(order=order), self._device)  # type: ignore[arg-type]

    def flatten(self) -> ndarray:
        return self.copy().reshape(-1)

    def view(self, dtype: Any = None) -> ndarray:
        return ndarray._wrap(self._a.view(dtype), self._device)

    def transpose(self, *axes: Any) -> ndarray:
        return ndarray._wrap(self._a.transpose(*axes), self._device)

    def copy(self, order: str = "C") -> ndarray:
        _check_device(self._device)
        out = _allocate(self.shape, self.dtype, fill=None)
        np.copyto(out._a, self._a)
        return out

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _check_device(self._device)
        out = _allocate(self.shape, dtype, fill=None)
        with np.errstate(all="ignore"):
            np.copyto(out._a, self._a, casting="unsafe")
        return out

    def fill(self, value: Any) -> None:
        _not_in_capture("fill")
        _check_device(self._device)
        self._a.fill(value)

    def __getitem__(self, key: Any) -> Any:
        key = _index(key)
        r = self._a[key]
        if isinstance(r, np.generic):  # an element: CuPy returns a 0-d view of it, as NumPy does with `...`
            r = self._a[(*(key if isinstance(key, tuple) else (key,)), Ellipsis)]
        return _wrap_result(r, self._device)

    def __setitem__(self, key: Any, value: Any) -> None:
        _not_in_capture("an assignment")
        _check_device(self._device)
        if isinstance(value, np.ndarray):  # CuPy copies host values to the device
            stats.host_to_device += 1
        else:
            value = _host(value)
        self._a[_index(key)] = value

    # reductions and friends as methods
    def _method(name: str) -> Any:  # type: ignore[misc]
        def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
            return _apply(getattr(np, name), (self, *args), kwargs)

        method.__name__ = name
        return method

    sum = _method("sum")
    max = _method("max")
    min = _method("min")
    mean = _method("mean")
    argmax = _method("argmax")
    argmin = _method("argmin")
    any = _method("any")
    all = _method("all")
    dot = _method("dot")
    prod = _method("prod")
    std = _method("std")
    var = _method("var")
    cumsum = _method("cumsum")
    clip = _method("clip")
    round = _method("round")
    squeeze = _method("squeeze")
    del _method


def _index(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        _check_device(key._device)
        return key._a
    if isinstance(key, np.ndarray):
        stats.host_to_device += 1
    return key


def _binary(ufunc: Any, reflected: bool = False, inplace: bool = False) -> Any:
    def method(self: ndarray, other: Any) -> Any:
        if isinstance(other, np.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        if not isinstance(other, (ndarray, int, float, complex, bool, np.generic)):
            return NotImplemented
        if inplace:
            with np.errstate(all="ignore"):
                ufunc(self._a, _host(other), out=self._a)
            _check_device(self._device)
            return self
        args = (other, self) if reflected else (self, other)
        return _apply(ufunc, args, {})

    return method


for _name, _ufunc in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                      ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power), ("and", np.bitwise_and),
                      ("or", np.bitwise_or), ("xor", np.bitwise_xor), ("matmul", np.matmul)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _binary(_ufunc, inplace=True))
for _name, _ufunc in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal),
                      ("eq", np.equal), ("ne", np.not_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__", lambda self, _u=_ufunc: _apply(_u, (self,), {}))


# ------------------------------------------------------------------------------------------------ creation
def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _allocate(shape, dtype)


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _allocate(shape, dtype, fill=0)


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return full(shape, 1, dtype)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    out = _allocate(shape, dtype if dtype is not None else np.asarray(fill_value).dtype, fill=None)
    out._a.fill(fill_value)
    return out


def empty_like(a: ndarray, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None) -> ndarray:
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a: ndarray, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None) -> ndarray:
    return zeros(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def ones_like(a: ndarray, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None) -> ndarray:
    return ones(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def full_like(a: ndarray, fill_value: Any, dtype: Any = None, order: str = "K", subok: Any = None,
              shape: Any = None) -> ndarray:
    return full(a.shape if shape is None else shape, fill_value, a.dtype if dtype is None else dtype)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False,
          ndmin: int = 0) -> ndarray:
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or np.dtype(dtype) == obj.dtype):
            return obj
        return obj.astype(dtype if dtype is not None else obj.dtype)
    if isinstance(obj, (list, tuple)) and builtins.any(isinstance(v, ndarray) for v in obj):
        return stack([asarray(v, dtype) for v in obj])
    with np.errstate(all="ignore"):  # CuPy casts on the device, without warnings
        host = np.asarray(obj, dtype=dtype)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    stats.host_to_device += 1
    out = _allocate(host.shape, host.dtype, fill=None)
    np.copyto(out._a, host)
    return out


def asarray(a: Any, dtype: Any = None, order: Any = None, blocking: bool = False) -> ndarray:
    return array(a, dtype, copy=False)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    a = asarray(a, dtype)
    return a if a.flags.c_contiguous else a.copy()


def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None) -> ndarray:
    host = np.arange(start, stop, step, dtype=dtype) if stop is not None else np.arange(start, dtype=dtype)
    out = _allocate(host.shape, host.dtype, fill=None)
    np.copyto(out._a, host)
    return out


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get()
    return np.asarray(a)


def get_array_module(*args: Any) -> Any:
    return sys.modules[__name__] if builtins.any(isinstance(a, ndarray) for a in args) else np


def stack(arrays: Any, axis: int = 0, out: Any = None) -> ndarray:
    return _apply(np.stack, (list(arrays),), {"axis": axis, **({"out": out} if out is not None else {})})


def concatenate(arrays: Any, axis: int = 0, out: Any = None, dtype: Any = None) -> ndarray:
    return _apply(np.concatenate, (list(arrays),), {"axis": axis, **({"out": out} if out is not None else {})})


# ------------------------------------------------------------------------------------------------ matmul
COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_FP16, COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64, \
    COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = range(7)
_compute_types: dict[np.dtype, int] = {}


def _set_compute_type(dtype: Any, compute_type: int) -> None:
    _compute_types[np.dtype(dtype)] = compute_type


def _tf32(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32's 10 mantissa bits (round to nearest even), as tensor cores read them."""
    bits = np.ascontiguousarray(a).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return rounded.astype(np.uint32).view(np.float32).reshape(a.shape)


def matmul(a: ndarray, b: ndarray, out: ndarray | None = None) -> ndarray:
    """cuBLAS's GEMM, emulated by NumPy's (TF32 inputs where the float32 compute type is TF32; 16-bit
    operands multiplied in float32 and the result rounded once, as cuBLAS's float32 compute type does)."""
    if _capture is not None:  # CuPy sets cuBLAS's stream before every call, and refuses a capturing one
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
    if not isinstance(a, ndarray) or not isinstance(b, ndarray):
        raise TypeError("matmul takes device arrays")
    A, B = _host(a), _host(b)
    product = _product(A, B, A.dtype == np.float32 and _compute_types.get(np.dtype(np.float32)) == COMPUTE_TYPE_TF32)
    if out is None:
        return _wrap_result(product)
    _host(out)[...] = product
    return out


def _product(A: np.ndarray, B: np.ndarray, tf32: bool) -> np.ndarray:
    """A @ B as cuBLAS computes it (emulated): TF32 inputs when ``tf32``, 16-bit operands in float32."""
    with np.errstate(all="ignore"):
        if tf32:
            A, B = _tf32(A), _tf32(B)
        if A.dtype.itemsize == 2 and A.dtype.kind != "i":  # float16 or bfloat16
            return np.matmul(A.astype(np.float32), B.astype(np.float32)).astype(A.dtype)
        return np.matmul(A, B)


class fastbp_blas_handle:  # noqa: N801 (named as the hook the cupy backend looks for)
    """fastbp's own cuBLAS handle (``fastbp.backends._cublas.CublasHandle``), emulated: the same operand
    checks and column-major mapping (``gemm_args``, so a layout the real handle refuses raises here too),
    the product as ``matmul`` computes it, recorded in a stream capture as a kernel launch is (cuBLAS on a
    handle whose stream and workspace were set beforehand captures). ``calls`` counts the products."""

    path = "cuBLAS (emulated)"

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.calls = 0

    def matmul(self, a: ndarray, b: ndarray, out: ndarray, tf32: bool = False) -> ndarray:
        from ..backends._cublas import element_strides, gemm_args, product_dtype

        A, B, C = _host(a), _host(b), _host(out)
        product_dtype(A, B, C, "cuBLAS")
        gemm_args(A.shape, element_strides(A), B.shape, element_strides(B), element_strides(C))
        use_tf32 = tf32 and A.dtype == np.float32

        def gemm() -> None:
            C[...] = _product(A, B, use_tf32)

        record(gemm)
        self.calls += 1
        return out


class fastbp_cublaslt:  # noqa: N801 (named as the hook the cupy backend looks for)
    """fastbp's cuBLASLt handle (``fastbp.backends._cublas.CublasLtHandle``), emulated by its reference: the
    same operand checks and argument mapping, then the product in float32 (float64 for float64) with the
    epilogue applied before the one rounding to the result's dtype, as cuBLASLt computes it; the
    activations and their derivatives are fastbp's NumPy ones. Its ReLU bit-mask has the documented size
    (``aux_ld`` bits a result row, ``aux_ld`` a multiple of 128) in an order of its own, which only its
    backward epilogue reads. Recorded in a stream capture as a launch is. ``calls`` counts the products by
    epilogue."""

    path = "cuBLASLt (emulated)"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.refuse: set[str] = set()  # epilogues to answer Unsupported for (as cuBLASLt may, for a shape)

    def matmul(self, a: ndarray, b: ndarray, out: ndarray, epilogue: str, bias: ndarray | None = None,
               aux: ndarray | None = None, aux_ld: int = 0, tf32: bool = False) -> ndarray:
        from ..activations import ACTIVATIONS
        from ..backends._cublas import EPILOGUES, Unsupported, lt_dims, product_dtype

        A, B, C = _host(a), _host(b), _host(out)
        product_dtype(A, B, C, "cuBLASLt")
        if epilogue not in EPILOGUES:
            raise ValueError(f"unknown epilogue {epilogue!r}")
        lt_dims(A, B, C)
        if epilogue in self.refuse:
            raise Unsupported(f"cuBLASLt has no algorithm for epilogue {EPILOGUES[epilogue]} (emulated refusal)")
        rows, n = C.shape
        vector: Any = None if bias is None else _host(bias)
        if vector is None or vector.shape != (n,):
            raise ValueError(f"epilogue {epilogue!r} takes a bias (gradient) of {n} values, got "
                             f"{None if vector is None else vector.shape}")
        X: Any = None if aux is None else _host(aux)
        if epilogue.startswith(("relu", "drelu")):
            if aux_ld % 128 or aux_ld < n or X is None or X.nbytes < aux_ld * rows // 8:
                raise ValueError(f"a ReLU bit-mask needs aux_ld a multiple of 128 >= {n} and {rows} rows of it")
        elif epilogue.startswith(("gelu", "dgelu")):
            if aux_ld != n or aux_ld % 8 or X is None or X.shape != C.shape or X.dtype != C.dtype:
                raise ValueError(f"the GELU input must be laid out as the result, with aux_ld = {n} a multiple of 8")
        wide = np.float64 if C.dtype == np.float64 else np.float32
        use_tf32 = tf32 and A.dtype == np.float32
        self.calls[epilogue] = self.calls.get(epilogue, 0) + 1

        def run() -> None:
            with np.errstate(all="ignore"):
                ops = (_tf32(A), _tf32(B)) if use_tf32 else (A, B)
                P = np.matmul(ops[0].astype(wide), ops[1].astype(wide))
                if epilogue in ("bias", "relu_aux_bias", "gelu_aux_bias"):
                    P += vector.astype(wide)
                if epilogue == "relu_aux_bias":
                    bits = np.zeros((rows, aux_ld), bool)
                    bits[:, :n] = P > 0
                    X.reshape(-1)[:aux_ld * rows // 8] = np.packbits(bits, axis=None, bitorder="little")
                    P = np.maximum(P, 0)
                elif epilogue == "gelu_aux_bias":
                    X[...] = P.astype(X.dtype)
                    P = ACTIVATIONS["gelu"].forward(np, P, np.empty_like(P), np.empty_like(P))
                elif epilogue == "drelu_bgrad":
                    bits = np.unpackbits(X.reshape(-1)[:aux_ld * rows // 8], bitorder="little")
                    P *= bits.reshape(rows, aux_ld)[:, :n]
                elif epilogue == "dgelu_bgrad":
                    Z = X.astype(wide)
                    ACTIVATIONS["gelu"].backward(np, P, Z, None, np.empty_like(P), np.empty_like(P))
                C[...] = P.astype(C.dtype)
                if epilogue in ("drelu_bgrad", "dgelu_bgrad"):
                    vector[...] = P.sum(axis=0).astype(vector.dtype)
                elif epilogue == "bgrada":
                    vector[...] = B.astype(wide).sum(axis=0).astype(vector.dtype)

        record(run)
        return out


# ------------------------------------------------------------------------------------------------ kernels
class _Kernel:
    """A RawModule function: ``kernel(grid, block, args, shared_mem=0)`` launches it in the emulator."""

    def __init__(self, kernel: cuda_emulator.EmulatedKernel) -> None:
        self._kernel = kernel
        self.name = kernel.name
        #: CUDA's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: a launch may ask for more dynamic shared
        #: memory than 48 KiB only after this is raised to it (up to the device's opt-in limit)
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid: Any, block: Any, args: tuple, *, shared_mem: int = 0, stream: Any = None,
                 enable_cooperative_groups: bool = False) -> None:
        if not isinstance(args, tuple):
            raise TypeError(f"kernel arguments must be a tuple, got {type(args).__name__}")
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise CUDARuntimeError(f"cudaErrorInvalidValue: {self.name} launched with {shared_mem} bytes of dynamic "
                                   f"shared memory, over its max_dynamic_shared_size_bytes "
                                   f"({self.max_dynamic_shared_size_bytes})")
        values: list[Any] = []
        for i, arg in enumerate(args):
            if isinstance(arg, ndarray):
                _check_device(arg._device, f"array of argument {i} of {self.name}")
                values.append(arg._a)
            elif isinstance(arg, np.ndarray):
                if arg.size != 1:  # CuPy passes a size-1 NumPy array by value and refuses others
                    raise TypeError(f"{self.name}: argument {i} is a NumPy array of size {arg.size}; CuPy kernels "
                                    "take device arrays (a size-1 NumPy array is passed by value)")
                values.append(arg.reshape(())[()])
            else:
                values.append(arg)
        def run() -> None:
            self._kernel.launch(grid, block, values, shared_mem=shared_mem, order=settings.order, seed=next(_seeds))
            stats.launches += 1
            stats.kernels[self.name] += 1

        record(run)


class RawModule:
    """CuPy's RawModule over the emulator: the source compiled for the host, each name expression a kernel."""

    def __init__(self, code: str | None = None, *, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, enable_cooperative_groups: bool = False,
                 name_expressions: Any = None, jitify: bool = False) -> None:
        if (code is None) == (path is None):
            raise TypeError("exactly one of code and path must be given")
        if not isinstance(options, tuple) or not builtins.all(isinstance(o, str) for o in options):
            raise TypeError("options must be a tuple of str")
        if code is None:
            raise NotImplementedError("the emulated RawModule compiles source code only")
        include_dirs = [o[2:] for o in options if o.startswith("-I")]
        self.code, self.options, self.name_expressions = code, options, list(name_expressions or [])
        self._module = cuda_emulator.compile_module(code, self.name_expressions, "<RawModule>", include_dirs)

    def get_function(self, name: str) -> _Kernel:
        return _Kernel(self._module.get_function(name))


# ------------------------------------------------------------------------------------------------ the namespace
#: NumPy functions CuPy has too, forwarded with CuPy's rules (device arrays only, 0-d results).
_FUNCTIONS = """abs absolute add all allclose any arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin
argsort
array_equal broadcast_to cbrt ceil clip copysign copyto cos cosh count_nonzero cumsum diag divide dot einsum
equal exp exp2 expand_dims expm1 fabs floor floor_divide fmax fmin greater greater_equal heaviside hstack
hypot isclose isfinite isinf isnan less less_equal log log10 log1p log2 logaddexp logaddexp2 logical_and
logical_not logical_or max maximum mean min minimum mod multiply negative nonzero not_equal outer power prod
ravel reciprocal remainder repeat reshape round sign signbit sin sinc sinh sort sqrt square squeeze std
subtract sum take tan tanh tensordot tile transpose true_divide trunc unique var vdot vstack where""".split()

float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_, dtype, newaxis, inf, nan, pi, e = np.bool_, np.dtype, np.newaxis, np.inf, np.nan, np.pi, np.e
finfo, iinfo, result_type, can_cast = np.finfo, np.iinfo, np.result_type, np.can_cast


def _forward(name: str) -> Any:
    fn = getattr(np, name)

    def forwarded(*args: Any, **kwargs: Any) -> Any:
        return _apply(fn, args, kwargs)

    forwarded.__name__ = name
    forwarded.__doc__ = f"numpy.{name} on device arrays (emulated CuPy)."
    return forwarded


for _name in _FUNCTIONS:
    globals().setdefault(_name, _forward(_name))


def _submodule(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(f"{__name__}.{name}")
    module.__dict__.update(attrs)
    sys.modules[module.__name__] = module
    return module


runtime = _submodule("cuda.runtime", CUDARuntimeError=CUDARuntimeError,
                     getDeviceCount=lambda: settings.device_count, getDevice=_current_device_id,
                     memGetInfo=lambda: (settings.memory_bytes - _pool.used_bytes(), settings.memory_bytes),
                     runtimeGetVersion=lambda: 13000, driverGetVersion=lambda: 13000, deviceSynchronize=lambda: None)
memory = _submodule("cuda.memory", OutOfMemoryError=OutOfMemoryError, MemoryPool=MemoryPool)
graph = _submodule("cuda.graph", Graph=Graph)
cuda = _submodule("cuda", Device=Device, Stream=Stream, get_current_stream=get_current_stream, runtime=runtime,
                  graph=graph,
                  memory=memory, is_available=lambda: True)
_routines_linalg = _submodule(
    "_core._routines_linalg", set_compute_type=_set_compute_type, COMPUTE_TYPE_DEFAULT=COMPUTE_TYPE_DEFAULT,
    COMPUTE_TYPE_TF32=COMPUTE_TYPE_TF32, COMPUTE_TYPE_FP32=COMPUTE_TYPE_FP32,
    COMPUTE_TYPE_PEDANTIC=COMPUTE_TYPE_PEDANTIC, get_compute_type=lambda dtype: _compute_types.get(np.dtype(dtype), 0))
_core = _submodule("_core", _routines_linalg=_routines_linalg)

del _name, _ufunc


# ------------------------------------------------------------------------------------------------ the backend
#: The name the emulated backend resolves by (``fb.MLP(..., backend="cupy-emulated")``; "cupy-emulated:1"
#: for the second emulated device).
BACKEND_NAME = "cupy-emulated"


def backend(device_id: int = 0) -> Any:
    """fastbp's cupy backend, its own code, driving this emulated CuPy on device ``device_id``."""
    from ..backends import cupy_backend

    instance = cupy_backend.create(device_id, cupy_module=sys.modules[__name__])
    instance.name = BACKEND_NAME
    return instance


def register() -> str:
    """Register the emulated backend under BACKEND_NAME (unlisted: only those who ask for it by name get it),
    after checking that kernels compile here; returns the name. Raises EmulatorUnavailable saying why not."""
    from ..backends import register_unlisted_backend

    cuda_emulator.compiler()
    register_unlisted_backend(BACKEND_NAME, backend)
    return BACKEND_NAME
