"""The CuPy backend: training on NVIDIA GPUs.

GEMMs go through cuBLAS (``cupy.matmul``; TF32 for float32 by ``set_tf32(True)``); everything around
them is one fused CUDA kernel from kernels/*.cu: the bias + activation epilogue, the backward pass that
applies g' and reduces the bias gradient (deterministic block reductions), the output delta fused with
its loss, and the optimizer updates. The kernels are compiled lazily by ``cupy.RawModule`` from an
explicit instantiation list (``cuda_sources.name_expressions``) the first time they are needed, never
at import, and CuPy caches the binaries on disk (CUPY_CACHE_DIR, by default ~/.cupy/kernel_cache).

After the first step of a given batch size, a step allocates nothing new: its buffers are the model's
workspace, and the few temporaries (reduction partials) are reused blocks of CuPy's memory pool.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import threading
from typing import Any

import numpy as np

from ..activations import ACTIVATIONS, CODES
from ..dtypes import HALF_DTYPES
from ..losses import LOSS_CODES
from . import BackendUnavailable, cuda_sources
from ._cublas import CublasHandle, CublasLtHandle, Unsupported, relu_mask_ld
from .base import Backend, target_kind
from .cuda_sources import COLSUM_BLOCK, DTYPES, kernel_dir, name_expressions

_DLPACK_CUDA = 2  # DLPack's kDLCUDA device type
_LT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes of cuBLASLt's epilogues here
_GRAPH_COUNT = threading.Lock()  # CupyBackend._graph_threads is counted by every thread


def _on_device(method):
    """Run a backend method with the backend's device current (for 'cupy:N' with N > 0). Inside a
    ``device_scope`` (the Trainer's, MLP's and Optimizer's public calls) the device is current already:
    the op only checks, so a step switches devices once, not once per op."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._get_device() == self.device_id:
            return method(self, *args, **kwargs)
        with self.device:
            return method(self, *args, **kwargs)

    return wrapper


class CupyBackend(Backend):
    """CuPy arrays on one CUDA device, cuBLAS GEMMs and fused CUDA kernels."""

    name = "cupy"
    # the 16-bit compute dtypes of mixed precision; CuPy's bfloat16 arrays need ml_dtypes
    compute_dtypes = ("float32", "float64", "float16") + (
        ("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ())

    def __init__(self, device_id: int = 0, cupy_module: Any = None) -> None:
        """The backend on CUDA device ``device_id``. ``cupy_module`` is the CuPy module to drive (the tests'
        emulated one, ``fastbp.testing.fake_cupy``); by default the real ``cupy``."""
        if cupy_module is None:
            cupy_module = importlib.import_module("cupy")
        self.xp = cupy_module
        self._get_device = cupy_module.cuda.runtime.getDevice
        self.device_id = device_id
        self.device = cupy_module.cuda.Device(device_id)
        self._modules: dict[str, Any] = {}
        self._kernels: dict[tuple[str, str], Any] = {}
        self._open_guard: Any = None  # an untripped guard, for ungated updates
        self._tf32 = False  # set_tf32
        self.epilogues = "kernels"  # set_epilogues
        self._lt: Any = None  # the cuBLASLt handle, made on first use
        self._relu_masks: dict[int, Any] = {}  # cuBLASLt's ReLU bit-masks, by the address of the layer's output
        self.fused_mlp = False  # set_fused_mlp
        self._mlp_sizes: dict[tuple[int, ...], Any] = {}  # a network's widths on the device, for mlp_fused_pass
        self._mlp_shared_set: dict[tuple, int] = {}  # the dynamic shared memory each fused kernel may use, as set
        self._mlp_plans: dict[tuple, tuple[str | None, int, int, int]] = {}  # by network shape: see _mlp_plan
        # threads inside gemms_through or capturing: while 0, the ops skip looking at their thread's state
        # (a lookup per launch would cost a small step a few percent)
        self._graph_threads = 0
        with self.device:
            self._sm_count = self.device.attributes["MultiProcessorCount"]

    def __repr__(self) -> str:
        return f"<fastbp backend {self.name!r} on device {self.device_id}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled by name and device (its CuPy module, device and compiled kernels are this process's):
        unpickling resolves 'cupy:N' again, so a pickled model comes back on the same device's backend."""
        from . import resolve_backend

        return resolve_backend, (f"{self.name}:{self.device_id}",)

    # ------------------------------------------------------------------ kernels
    def _kernel(self, file: str, template: str, dtype: Any, act: int = 0, gdtype: Any = None) -> Any:
        """The compiled kernel ``template`` from ``file``; {T} is replaced by the C type of ``dtype``, {G} by
        that of ``gdtype`` (an update's gradient; ``dtype`` when None), {ACT} by ``act`` (an activation code,
        or the loss code of pointwise_loss: the kernel's int template parameter)."""
        ctype = DTYPES[np.dtype(dtype).name]
        name = (template.replace("{T}", ctype).replace("{ACT}", str(act))
                .replace("{G}", ctype if gdtype is None else DTYPES[np.dtype(gdtype).name]))
        kernel = self._kernels.get((file, name))
        if kernel is None:
            module = self._modules.get(file)
            if module is None:  # one self-contained source, so CuPy's cache sees edits to included headers
                module = self.xp.RawModule(code=cuda_sources.source(file), options=("--std=c++17",),
                                           name_expressions=name_expressions(file))
                self._modules[file] = module
            kernel = self._kernels[(file, name)] = module.get_function(name)
        return kernel

    def _launch(self, file: str, template: str, dtype: Any, grid: tuple, block: tuple, args: tuple,
                act: int = 0, gdtype: Any = None, shared_mem: int = 0) -> None:
        """Launch kernel ``template`` of ``file`` (see ``_kernel``). This is where arrays become raw pointers,
        so it checks them: each must be a CuPy array on this backend's device and C-contiguous (the kernels
        index flat memory), and an integer array int64 (the only integer pointer the kernels take).
        Anything else is refused with a message naming the kernel and the argument instead of being handed
        over to be misread (CuPy would pass the pointer as it is). The ops convert what they read before
        they get here."""
        kernel = self._kernel(file, template, dtype, act, gdtype)
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                raise TypeError(f"{template} argument {i}: a host (NumPy) array; kernels take device arrays")
            if not isinstance(a, self.xp.ndarray):
                continue
            if a.data.device_id != self.device_id:  # an int: cheaper than building a.device
                problem = f"is on device {a.data.device_id}, not this backend's device {self.device_id}"
            elif not a.flags.c_contiguous:
                problem = f"is not C-contiguous (strides {a.strides})"
            elif a.dtype.kind in "iub" and a.dtype != np.int64:
                problem = f"is {a.dtype}; integer arrays must be int64"
            else:
                continue
            raise ValueError(f"{template} argument {i} {problem}")
        if self._graph_threads:
            self._keep(args)
        kernel(grid, block, args, shared_mem=shared_mem)

    def _stats_out(self, stats_out: Any, acc: Any) -> Any:
        """The [loss, correct count] buffer a loss kernel writes: ``stats_out``, checked, or when None a
        per-thread one (the loss returned is then a view of it, valid until this thread's next step)."""
        if stats_out is None:
            return self._scratch("stats", (2,), acc)
        if stats_out.shape != (2,) or stats_out.dtype != acc:
            raise ValueError(f"stats_out must be a (2,) {np.dtype(acc)} array, got {stats_out.shape} {stats_out.dtype}")
        return stats_out

    def _out_scalar(self, out: Any, dtype: Any) -> Any:
        """``out`` when it is a 0-d ``dtype`` array on this device (the caller's buffer), else a new one."""
        if isinstance(out, self.xp.ndarray) and out.shape == () and out.dtype == dtype \
                and out.data.device_id == self.device_id:
            return out
        return self.xp.empty((), dtype)

    def _grid(self, total: int) -> int:
        return max(1, min((total + cuda_sources.THREADS - 1) // cuda_sources.THREADS, self._sm_count * 32))

    def _acc_dtype(self, dtype: Any) -> Any:
        return np.float64 if np.dtype(dtype) == np.float64 else np.float32

    # ------------------------------------------------------------------ memory
    @_on_device
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        try:
            return self.xp.ascontiguousarray(self.xp.asarray(x, dtype=dtype))
        except self.xp.cuda.memory.OutOfMemoryError as exc:
            # x may be a device array: its size and dtype, never np.asarray(x) (which CuPy refuses)
            host = None if hasattr(x, "shape") else np.asarray(x)
            shape = x.shape if host is None else host.shape
            itemsize = np.dtype(dtype if dtype is not None else (x if host is None else host).dtype).itemsize
            raise self._oom(math.prod(shape) * itemsize) from exc

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.xp.asnumpy(x)

    def adopt(self, x: Any) -> Any:
        if hasattr(x, "__cuda_array_interface__") and not self.is_array(x) and not hasattr(x, "__dlpack__"):
            with self.device:  # a Numba CUDA array and the like: CuPy wraps its memory, no copy
                return self.xp.asarray(x)
        return super().adopt(x)

    def _from_dlpack(self, x: Any) -> Any:
        device = x.__dlpack_device__() if hasattr(x, "__dlpack_device__") else None
        if device is not None and int(device[0]) == _DLPACK_CUDA and int(device[1]) == self.device_id \
                and hasattr(self.xp, "from_dlpack"):
            with self.device:
                return self.xp.from_dlpack(x)  # on this device already: a view, no copy
        return super()._from_dlpack(x)  # on the host or another device: through host memory

    @_on_device
    def empty(self, shape: Any, dtype: Any) -> Any:
        try:
            return self.xp.empty(shape, dtype=dtype)
        except self.xp.cuda.memory.OutOfMemoryError as exc:
            raise self._oom(int(np.prod(shape)) * np.dtype(dtype).itemsize) from exc

    @_on_device
    def zeros(self, shape: Any, dtype: Any) -> Any:
        out = self.empty(shape, dtype)
        out.fill(0)
        return out

    def _oom(self, nbytes: int) -> MemoryError:
        pool = self.xp.get_default_memory_pool()
        pool.free_all_blocks()
        free, total = self.xp.cuda.runtime.memGetInfo()
        return MemoryError(f"out of GPU memory on device {self.device_id}: asked for {nbytes / 2**20:.1f} MiB, "
                           f"{free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB (the fastbp pool holds "
                           f"{pool.total_bytes() / 2**20:.1f} MiB); use a smaller batch or model")

    def device_scope(self) -> Any:
        return self.device

    @_on_device
    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    @_on_device
    def to_floats(self, *xs: Any) -> tuple[float, ...]:
        xp = self.xp
        values = xp.stack([xp.asarray(x, dtype=np.float64).reshape(()) for x in xs]).get()
        return tuple(float(v) for v in values)

    @_on_device
    def take_rows(self, X: Any, idx: Any, out: Any = None) -> Any:
        return self.xp.take(X, idx, axis=0, out=out)

    @_on_device
    def matmul(self, A: Any, B: Any, out: Any = None) -> Any:
        return self._matmul(A, B, out)

    def _matmul(self, A: Any, B: Any, out: Any = None) -> Any:
        """A @ B through cuBLAS: CuPy's, or this thread's own handle inside ``gemms_through`` (CUDA graphs)."""
        blas = getattr(self._thread_state(), "blas", None) if self._graph_threads else None
        if blas is None:
            return self.xp.matmul(A, B, out=out)
        if out is None:
            out = self.xp.empty((A.shape[0], B.shape[1]), A.dtype)
        self._keep((A, B, out))
        return blas.matmul(A, B, out, self._tf32)

    def set_tf32(self, enabled: bool) -> None:
        """Let cuBLAS run float32 GEMMs on TF32 tensor cores (faster, ~1e-3 relative precision)."""
        linalg = importlib.import_module(f"{self.xp.__name__}._core._routines_linalg")
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
        self._tf32 = bool(enabled)

    def set_epilogues(self, mode: str) -> None:
        """Where the work around the GEMMs runs: 'kernels' (the default), fastbp's CUDA kernels; or 'cublaslt',
        fused into the GEMMs by cuBLASLt's epilogues where they exist: the forward GEMM with the bias and
        relu or gelu (or the bias alone, for the output layer), the backward GEMM with relu's or gelu's
        derivative and the bias gradient, and the output layer's weight gradient GEMM with its bias
        gradient. Other activations, float64, and a gelu layer whose width is not a multiple of 8 keep
        the kernels. cuBLASLt rounds once after the epilogue (the kernels round the GEMM's result, then
        again after it) and sums bias gradients in its own order, so the two differ in the last bits."""
        if mode not in ("kernels", "cublaslt"):
            raise ValueError(f"epilogues must be 'kernels' or 'cublaslt', got {mode!r}")
        if mode == "cublaslt":
            self._cublaslt()  # fails here, with the reason, where cuBLASLt cannot be called
        self.epilogues = mode
        self._relu_masks.clear()

    def _lt_matmul(self, A: Any, B: Any, out: Any, epilogue: str, bias: Any, aux: Any = None, aux_ld: int = 0) -> None:
        """out = epilogue(A @ B) through cuBLASLt (``_cublas.CublasLtHandle.matmul``); Unsupported where it
        has no algorithm for it."""
        self._keep((A, B, out, bias, aux))
        self._cublaslt().matmul(A, B, out, epilogue, bias=bias, aux=aux, aux_ld=aux_ld, tf32=self._tf32)

    def _cublaslt(self) -> Any:
        """fastbp's cuBLASLt handle (``_cublas.CublasLtHandle``; the emulated CuPy brings its own,
        ``fastbp_cublaslt``), made once."""
        if self._lt is None:
            with self.device:
                emulated = getattr(self.xp, "fastbp_cublaslt", None)
                if emulated is not None:
                    self._lt = emulated()
                else:
                    self._lt = CublasLtHandle(self.xp)
        return self._lt

    def _fused_epilogue(self, activation: str, dtype: Any, n: int) -> bool:
        """Whether a layer's epilogue runs in cuBLASLt (``set_epilogues``)."""
        return (self.epilogues == "cublaslt" and np.dtype(dtype).name in _LT_DTYPES
                and (activation in ("identity", "relu") or (activation == "gelu" and n % 8 == 0)))

    def _relu_mask(self, A: Any, create: bool) -> tuple[Any, int] | None:
        """(cuBLASLt's ReLU bit-mask of the layer whose output is A, its leading dimension in bits): made
        for A's size when ``create``, else the one a forward epilogue wrote, or None."""
        rows, n = A.shape
        ld = relu_mask_ld(n)
        mask = self._relu_masks.get(A.data.ptr)
        if mask is not None and mask[1] == (rows, ld):
            return mask[0], ld
        if not create:
            return None
        # past 256, drop masks of buffers long gone (inference at many batch sizes, say); none while held
        while len(self._relu_masks) >= 256 and not self._caches_held():
            self._relu_masks.pop(next(iter(self._relu_masks)))
        buf = self.xp.empty(rows * ld // 8, np.uint8)
        self._relu_masks[A.data.ptr] = (buf, (rows, ld))
        return buf, ld

    # ------------------------------------------------------------------ the fused narrow MLP (mlp.cu)
    def set_fused_mlp(self, enabled: bool) -> None:
        """Run the forward and backward passes of a training step as one kernel where the network allows
        (``mlp_fused_pass`` in kernels/mlp.cu, after tiny-cuda-nn's fully fused MLPs: a tile of rows through
        every layer, its activations and one layer's weights at a time in shared memory, then the weight
        gradients' per-block sums added in a fixed order): float32, float64 or bfloat16 compute (float16,
        whose loss is scaled, runs layer by layer), one hidden activation, cross-entropy on class labels
        without sample weights, and shared arrays that fit
        one block (``mlp_shared_bytes``: in float32, every width up to 64 within the 48 KiB any GPU gives,
        up to 128 with the opt-in shared memory of an A100 or H100). Elsewhere the layer-by-layer path runs,
        and ``fused_mlp_route`` says why. Off by default: how it compares with cuBLAS waits for a GPU."""
        self.fused_mlp = bool(enabled)

    def fused_mlp_route(self, model: Any) -> str | None:
        """Why a training step of ``model`` does not run fused, or None where it does (``set_fused_mlp``;
        the loss must be cross-entropy on labels, without sample weights, besides)."""
        if not self.fused_mlp:
            return "off (set_fused_mlp(True) turns it on)"
        return self._mlp_plan(model)[0]

    def _mlp_plan(self, model: Any) -> tuple[str | None, int, int, int]:
        """(why ``model`` cannot run fused, or None; rows per tile; shared bytes; blocks per SM), kept per
        network shape. The tile: the most rows, of 32, 16 and 8, whose arrays fit the 48 KiB any block may
        have, else the most that fit this device's opt-in. Blocks per SM: as many as the SM's shared memory
        holds, up to 4 (each adds a row of partial gradients to sum)."""
        key = (tuple(model.sizes), np.dtype(model.compute_dtype), tuple(model.activations))
        plan = self._mlp_plans.get(key)
        if plan is not None:
            return plan
        dtype, hidden = key[1], set(model.activations[:-1])
        why: str | None = None
        tile = nbytes = per_sm = 0
        if dtype.name not in ("float32", "float64", "bfloat16"):
            why = f"{dtype.name} compute (its loss scaling runs layer by layer)"
        elif len(hidden) > 1:
            why = "more than one hidden activation"
        elif not hidden <= set(CODES):
            why = f"the activation {hidden.pop()!r} has no CUDA code"
        else:
            keeps = _keeps_z(model)
            optin = self._shared_optin()
            fits = [(t, size) for limit in (SHARED_DEFAULT, optin) for t in (32, 16, 8)
                    if (size := mlp_shared_bytes(model.sizes, dtype, t, keeps)) <= limit]
            if fits:
                tile, nbytes = fits[0]
                shared_per_sm = int(self.device.attributes.get("MaxSharedMemoryPerMultiprocessor", optin))
                per_sm = max(1, min(4, shared_per_sm // nbytes))
            else:
                why = (f"its shared arrays fit no block: {mlp_shared_bytes(model.sizes, dtype, 8, keeps)} bytes for "
                       f"tiles of 8 rows, where this device allows {optin}")
        plan = self._mlp_plans[key] = (why, tile, nbytes, per_sm)
        return plan

    def _shared_optin(self) -> int:
        """The most dynamic shared memory a block may have on this device, opted in."""
        attributes = self.device.attributes
        return int(attributes.get("MaxSharedMemoryPerBlockOptin", attributes["MaxSharedMemoryPerBlock"]))

    @_on_device
    def train_gradients(self, model, X, y, loss, stats_out=None):
        """Forward and backward in one kernel (``set_fused_mlp``), into ``model.flat_grad()``: returns (the
        loss, the output), or None where the fused pass does not apply (``fused_mlp_route``)."""
        if not self.fused_mlp or loss != "cross_entropy" or y.ndim != 1 or X.dtype != model.compute_dtype:
            return None
        why, tile, nbytes, per_sm = self._mlp_plan(model)
        if why is not None:
            return None
        xp = self.xp
        rows, dtype, acc = X.shape[0], X.dtype, self._acc_dtype(X.dtype)
        grid = min(-(-rows // tile), per_sm * self._sm_count)  # at most the tiles: every block has one
        stats_out = self._stats_out(stats_out, acc)
        row_stats = self._scratch("row_stats", (2 * rows,), acc)
        partial = self._scratch("mlp_partial", (grid, model.n_params), acc)
        out = model._workspace(rows).Z[-1]  # the output layer's Z, as the layer-by-layer path leaves it
        sizes = self._mlp_sizes.get(tuple(model.sizes))
        if sizes is None:
            sizes = self._mlp_sizes[tuple(model.sizes)] = xp.asarray(np.array(model.sizes, np.int64))
        act = CODES[model.activations[0] if len(model.layers) > 1 else "identity"]
        if nbytes > SHARED_DEFAULT:  # opt in once per kernel, as CUDA requires past 48 KiB
            kernel = self._kernel("mlp.cu", "mlp_fused_pass<{T}, {ACT}>", dtype, act=act)
            if self._mlp_shared_set.get((dtype, act), SHARED_DEFAULT) < nbytes:
                kernel.max_dynamic_shared_size_bytes = nbytes
                self._mlp_shared_set[(dtype, act)] = nbytes
        labels = xp.ascontiguousarray(y, dtype=np.int64)
        self._launch("mlp.cu", "mlp_fused_pass<{T}, {ACT}>", dtype, (grid,), (cuda_sources.MLP_THREADS,),
                     (X, labels, model._flat_compute, sizes, np.int32(len(model.layers)), np.int32(rows),
                      np.int32(tile), out, row_stats, partial, np.int64(model.n_params)), act=act, shared_mem=nbytes)
        self._launch("dense.cu", "sum_partials<{T}>", dtype, (self._grid(model.n_params),), (cuda_sources.THREADS,),
                     (partial, model.flat_grad(), np.int32(grid), np.int32(model.n_params)))
        self._launch("loss.cu", "reduce_loss<{T}>", acc, (1,), (cuda_sources.REDUCE_THREADS,),
                     (row_stats, np.int32(rows), acc(1.0 / rows), stats_out))
        return stats_out[0], out

    def memory_in_use(self) -> int:
        """Bytes of device memory held by CuPy's pool (in use and cached)."""
        return int(self.xp.get_default_memory_pool().total_bytes())

    # ------------------------------------------------------------------ CUDA graphs (fastbp.graphs)
    def graph_support(self) -> str | None:
        if not hasattr(self.xp.cuda.Stream, "begin_capture"):
            return f"this CuPy ({self.xp.__version__}) has no stream capture (Stream.begin_capture)"
        return None

    def graph_stream(self) -> Any:
        """A new stream on this device to run (and capture) training steps on."""
        with self.device:
            return self.xp.cuda.Stream(non_blocking=True)

    def blas_handle(self, stream: Any) -> Any:
        """A cuBLAS handle of fastbp's own on ``stream`` (``_cublas.CublasHandle``; the emulated CuPy brings
        its own, ``fastbp_blas_handle``): GEMMs that a stream capture can record, which CuPy's cannot."""
        with self.device:
            emulated = getattr(self.xp, "fastbp_blas_handle", None)
            if emulated is not None:
                return emulated(stream)
            return CublasHandle(self.xp, stream)

    def gemms_through(self, handle: Any) -> Any:
        """This thread's GEMMs on this backend go through ``handle`` inside the block."""
        return self._graph_state(blas=handle)

    def capturing(self, at: dict[str, Any], used: set[str], kept: list[Any]) -> Any:
        """Inside the block (a graph capture): the update kernels read their structure from the device
        arrays ``at[name]`` ('sgd', 'adam', 'rmsprop') and nonfinite_guard its step number from
        ``at['step']``, instead of the values passed by value, which a graph would freeze (each name read is
        added to ``used``); every device array a kernel or a GEMM is given is appended to ``kept``, so that
        the graph's owner keeps its memory alive (a scratch buffer or workspace dropped from its cache
        later must not be handed to another array while the graph still writes it)."""
        return self._graph_state(args_at=at, args_used=used, kept=kept)

    @contextlib.contextmanager
    def _graph_state(self, **values: Any) -> Any:
        """This thread's graph settings ``values`` inside the block (the previous ones after it), with the
        count of threads that have any, which the ops look at first, kept under a lock."""
        local = self._thread_state()
        before = {name: getattr(local, name, None) for name in values}
        for name, value in values.items():
            setattr(local, name, value)
        with _GRAPH_COUNT:
            self._graph_threads += 1
        try:
            yield
        finally:
            for name, value in before.items():
                setattr(local, name, value)
            with _GRAPH_COUNT:
                self._graph_threads -= 1

    def _keep(self, arrays: Any) -> None:
        """Inside ``capturing``, keep the device arrays among ``arrays`` (see there)."""
        kept = getattr(self._thread_state(), "kept", None) if self._graph_threads else None
        if kept is not None:
            kept.extend(a for a in arrays if isinstance(a, self.xp.ndarray))

    def _args_at(self, name: str) -> Any:
        """The device array a kernel reads its per-step arguments ``name`` from, or None (by value)."""
        if not self._graph_threads:
            return None
        local = self._thread_state()
        at = getattr(local, "args_at", None)
        if at is None:
            return None
        local.args_used.add(name)
        return at[name]

    # ------------------------------------------------------------------ layers
    @_on_device
    def dense_forward(self, X, W, b, activation, A_out=None, Z_out=None):
        act = ACTIVATIONS[activation]
        if self._fused_epilogue(activation, X.dtype, W.shape[1]):
            fused = self._lt_forward(X, W, b, activation, A_out, Z_out)
            if fused is not None:
                return fused
        Z = self._matmul(X, W, Z_out)
        A = Z if act.keeps == "output" else (A_out if A_out is not None else self.xp.empty_like(Z))
        total = Z.size
        b = self.xp.ascontiguousarray(b, dtype=Z.dtype)
        # a user's activation (activations.register) has no kernel: the bias kernel, then its xp forward
        code = CODES["identity"] if not act.builtin else CODES[activation]
        self._launch("dense.cu", "forward_epilogue<{T}, {ACT}>", Z.dtype, (self._grid(total),), (cuda_sources.THREADS,),
                     (Z, b, Z if not act.builtin else A, np.int64(total), np.int32(Z.shape[1])), act=code)
        if not act.builtin:
            act.forward(self.xp, Z, A, None)
        return A, Z

    def _lt_forward(self, X, W, b, activation, A_out, Z_out):
        """dense_forward with its epilogue fused into the GEMM by cuBLASLt: Z = X W + b, A = g(Z); relu's A is
        written over Z with its bit-mask aside (for the backward epilogue), gelu's Z is the auxiliary output.
        None where cuBLASLt has no algorithm for it (the kernels run)."""
        rows, n = X.shape[0], W.shape[1]
        Z = Z_out if Z_out is not None else self.xp.empty((rows, n), X.dtype)
        b = self.xp.ascontiguousarray(b, dtype=Z.dtype)
        try:
            if activation == "identity":
                self._lt_matmul(X, W, Z, "bias", b)
                return Z, Z
            if activation == "relu":
                mask, ld = self._relu_mask(Z, create=True)
                self._lt_matmul(X, W, Z, "relu_aux_bias", b, mask, ld)
                return Z, Z
            A = A_out if A_out is not None else self.xp.empty_like(Z)
            self._lt_matmul(X, W, A, "gelu_aux_bias", b, Z, n)
            return A, Z
        except Unsupported:
            self._relu_masks.pop(Z.data.ptr, None)  # no mask was written: the backward must not read one
            return None

    def _backward_epilogue(self, delta, S, code, db):
        """delta *= g'(S) (code != identity) and db = column sums of delta, deterministic."""
        rows, n = delta.shape
        col_tiles = (n + 31) // 32
        slabs = max(1, min((4 * self._sm_count + col_tiles - 1) // col_tiles, (rows + 7) // 8))
        rows_per_slab = (rows + slabs - 1) // slabs
        slabs = (rows + rows_per_slab - 1) // rows_per_slab
        partial = self._scratch("colsum", (slabs, n), self._acc_dtype(delta.dtype))
        S = delta if S is None else self.xp.ascontiguousarray(S, dtype=delta.dtype)
        self._launch("dense.cu", "backward_epilogue<{T}, {ACT}>", delta.dtype, (col_tiles, slabs), COLSUM_BLOCK,
                     (delta, S, partial, np.int32(rows), np.int32(n), np.int32(rows_per_slab)), act=code)
        self._launch("dense.cu", "sum_partials<{T}>", delta.dtype, (self._grid(n),), (cuda_sources.THREADS,),
                     (partial, db, np.int32(slabs), np.int32(n)))

    @_on_device
    def dense_grads(self, delta, A_prev, dW_out=None, db_out=None):
        db = db_out if db_out is not None else self.xp.empty(delta.shape[1], delta.dtype)
        if self._fused_epilogue("identity", delta.dtype, delta.shape[1]):  # eq. (3) with eq. (4) fused
            dW = dW_out if dW_out is not None else self.xp.empty((A_prev.shape[1], delta.shape[1]), delta.dtype)
            try:
                self._lt_matmul(A_prev.T, delta, dW, "bgrada", db)
                return dW, db
            except Unsupported:
                dW_out = dW
        dW = self._matmul(A_prev.T, delta, dW_out)  # eq. (3)
        self._backward_epilogue(delta, None, CODES["identity"], db)  # eq. (4)
        return dW, db

    @_on_device
    def backprop_dense(self, delta_next, W_next, Z, A, A_prev, activation, delta_out=None, dW_out=None,
                       db_out=None):
        xp = self.xp
        rows, n = delta_next.shape[0], W_next.shape[0]
        mask = self._relu_mask(A, create=False) if activation == "relu" else None
        if self._fused_epilogue(activation, delta_next.dtype, n) and (activation == "gelu" or mask is not None):
            # eq. (2) with g' and eq. (4) fused into the product (relu: the forward epilogue's bit-mask)
            delta = delta_out if delta_out is not None else xp.empty((rows, n), delta_next.dtype)
            db = db_out if db_out is not None else xp.empty(n, delta.dtype)
            aux, ld, epilogue = (Z, n, "dgelu_bgrad") if activation == "gelu" else (*mask, "drelu_bgrad")
            try:
                self._lt_matmul(delta_next, W_next.T, delta, epilogue, db, aux, ld)
                return delta, self._matmul(A_prev.T, delta, dW_out), db  # eq. (3)
            except Unsupported:
                delta_out, db_out = delta, db  # the kernels below, into the same buffers
        delta = self._matmul(delta_next, W_next.T, delta_out)  # eq. (2), the product
        db = db_out if db_out is not None else xp.empty(delta.shape[1], delta.dtype)
        act = ACTIVATIONS[activation]
        if not act.builtin:  # a user's activation: its xp derivative, then the plain column sums
            act.backward(xp, delta, Z, A, None, None)
            self._backward_epilogue(delta, None, CODES["identity"], db)
        else:
            kept = A if act.keeps == "output" else Z
            self._backward_epilogue(delta, kept, CODES[activation], db)  # eq. (2) * g', and eq. (4)
        dW = self._matmul(A_prev.T, delta, dW_out)  # eq. (3)
        return delta, dW, db

    # ------------------------------------------------------------------ losses
    @_on_device
    def output_delta(self, Z_L, y, loss, delta_out=None, stats_out=None, weights=None):
        xp = self.xp
        rows, C = Z_L.shape
        delta = delta_out if delta_out is not None else xp.empty_like(Z_L)
        acc = self._acc_dtype(Z_L.dtype)
        stats_out = self._stats_out(stats_out, acc)
        row_stats = self._scratch("row_stats", (2 * rows,), acc)  # the row losses, then the correct counts
        blocks = (rows * 32 + cuda_sources.THREADS - 1) // cuda_sources.THREADS
        if loss == "cross_entropy":
            soft = y.ndim == 2
            # the kernel reads labels as long long and target rows as T: convert whatever came
            labels = xp.ascontiguousarray(y, dtype=np.int64) if not soft else self._scratch("no_labels", (0,), np.int64)
            targets = xp.ascontiguousarray(y, dtype=Z_L.dtype) if soft else Z_L  # unused with labels
            self._launch("loss.cu", "softmax_ce<{T}>", Z_L.dtype, (blocks,), (cuda_sources.THREADS,),
                         (Z_L, labels, targets, delta, row_stats, np.int32(rows), np.int32(C), np.int32(soft)))
            scale = 1.0 / rows
        elif loss in ("binary_cross_entropy", "mse"):
            targets = xp.ascontiguousarray(y, dtype=Z_L.dtype)
            self._launch("loss.cu", "pointwise_loss<{T}, {ACT}>", Z_L.dtype, (blocks,), (cuda_sources.THREADS,),
                         (Z_L, targets, delta, row_stats, np.int32(rows), np.int32(C)), act=LOSS_CODES[loss])
            scale = 1.0 / (rows * C)
        else:
            raise ValueError(f"unknown loss {loss!r}")
        if weights is not None:  # sample weights: on the row losses before the reduction, and on delta's rows
            row_stats[:rows] *= weights
            delta *= weights[:, None].astype(delta.dtype, copy=False)  # 16-bit delta: a same-dtype product
        self._launch("loss.cu", "reduce_loss<{T}>", acc, (1,), (cuda_sources.REDUCE_THREADS,),
                     (row_stats, np.int32(rows), acc(scale), stats_out))
        return stats_out[0], delta

    # ------------------------------------------------------------------ optimizers (one pass each)
    @contextlib.contextmanager
    def _in_place(self, dtype: Any, *arrays: Any) -> Any:
        """Flat C-contiguous views of arrays that a kernel updates in place (None stays None). One that is
        not contiguous is updated through a contiguous copy written back at the end, as the NumPy
        reference would update it (a reshape would copy it and lose the update); each must have ``dtype``."""
        flats: list[Any] = []
        back: list[tuple[Any, Any]] = []
        for a in arrays:
            if a is None:
                flats.append(None)
                continue
            if a.dtype != dtype:
                raise TypeError(f"arrays updated in place must be {np.dtype(dtype)} like the parameter, got {a.dtype}")
            if a.flags.c_contiguous:
                flats.append(a.reshape(-1))
            else:
                copy = self.xp.ascontiguousarray(a)
                flats.append(copy.reshape(-1))
                back.append((a, copy))
        yield flats
        for a, copy in back:
            a[...] = copy

    def _flat_in(self, x: Any, dtype: Any) -> Any:
        """An array a kernel reads, flat, C-contiguous and in ``dtype`` (a copy only where needed)."""
        return self.xp.ascontiguousarray(x, dtype=dtype).reshape(-1)

    def _guard_or_open(self, guard):
        """The guard the update kernels read (an untripped one for an ungated update)."""
        if guard is not None:
            return guard
        if self._open_guard is None:
            self._open_guard = self.xp.zeros(1, np.float64)
        return self._open_guard

    # ------------------------------------------------------------------ fused optimizer updates
    # Optimizer.step calls them by the optimizer's ``fused`` name (see Backend.fused_updates); each is one
    # kernel of optim.cu over the flat parameter, equal to the optimizer's reference update bit for bit.
    # Mixed precision: a float32 parameter takes a 16-bit gradient as it is, and ``copy`` (the model's
    # 16-bit compute copy of the parameter) receives the updated values in the same pass; ``unscale`` (loss
    # scaling) is a one-element float32 array holding 1 / the loss scale, which multiplies the gradient.
    def _update_operands(self, p: Any, g: Any, copy: Any) -> tuple[Any, Any, Any] | None:
        """(gradient, copy, the gradient's dtype) as an update kernel reads them: the gradient flat, in its
        16-bit dtype when ``p`` is float32 and it is one, else in ``p``'s dtype; ``copy`` flat or None.
        None when no kernel takes these (a copy in another dtype than the gradient's, or not contiguous):
        the reference update runs."""
        half = p.dtype == np.float32 and g.dtype.name in HALF_DTYPES
        gdtype = g.dtype if half else p.dtype
        if copy is not None:
            if copy.dtype != gdtype or not copy.flags.c_contiguous or copy.size != p.size:
                return None
            copy = copy.reshape(-1)
        return self._flat_in(g, gdtype), copy, gdtype

    @_on_device
    def _sgd_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        operands = self._update_operands(p, g, copy)
        if operands is None:
            return False
        g, copy, gdtype = operands
        with self._in_place(p.dtype, p, slots.get("momentum")) as (p, buf):
            args = self._update_record("sgd", lr, step, hp)[0]  # a struct, copied at launch
            self._launch("optim.cu", "sgd<{T}, {G}>", p.dtype, (self._grid(p.size),), (cuda_sources.THREADS,),
                         (p, g, buf if buf is not None else p, np.int64(p.size), args, self._args_at("sgd"),
                          self._guard_or_open(guard), copy, unscale), gdtype=gdtype)
        return True

    @_on_device
    def _adam_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        operands = self._update_operands(p, g, copy)
        if operands is None:
            return False
        g, copy, gdtype = operands
        with self._in_place(p.dtype, p, slots["m"], slots["v"]) as (p, m, v):
            args = self._update_record("adam", lr, step, hp)[0]
            self._launch("optim.cu", "adam<{T}, {G}>", p.dtype, (self._grid(p.size),), (cuda_sources.THREADS,),
                         (p, g, m, v, np.int64(p.size), args, self._args_at("adam"), self._guard_or_open(guard), copy,
                          unscale),
                         gdtype=gdtype)
        return True

    @_on_device
    def _rmsprop_update(self, p, g, slots, lr, step, hp, guard, copy=None, unscale=None):
        operands = self._update_operands(p, g, copy)
        if operands is None:
            return False
        g, copy, gdtype = operands
        with self._in_place(p.dtype, p, slots["square_avg"], slots.get("momentum")) as (p, sq, buf):
            args = self._update_record("rmsprop", lr, step, hp)[0]
            self._launch("optim.cu", "rmsprop<{T}, {G}>", p.dtype, (self._grid(p.size),), (cuda_sources.THREADS,),
                         (p, g, sq, buf if buf is not None else p, np.int64(p.size), args, self._args_at("rmsprop"),
                          self._guard_or_open(guard), copy, unscale), gdtype=gdtype)
        return True

    fused_updates = {"sgd": _sgd_update, "adam": _adam_update, "rmsprop": _rmsprop_update}

    # ------------------------------------------------------------------ the deferred non-finite check
    deferred_checks = True  # a host read per step would stall the GPU's queue every step

    @_on_device
    def nonfinite_guard(self, value, sumsq, guard, step):
        self._launch("optim.cu", "nonfinite_guard<{T}>", value.dtype, (1,), (1,),
                     (value, sumsq.astype(value.dtype, copy=False), guard, np.int64(step), self._args_at("step")))

    # ------------------------------------------------------------------ dynamic loss scaling (float16)
    @_on_device
    def scale_by(self, x, state):
        with self._in_place(x.dtype, x) as (flat,):
            self._launch("optim.cu", "scale_by<{T}>", flat.dtype, (self._grid(flat.size),), (cuda_sources.THREADS,),
                         (flat, np.int64(flat.size), state))

    @_on_device
    def loss_scale_update(self, sumsq, state, guard, gate, growth, backoff, interval):
        self._launch("optim.cu", "loss_scale_update<{T}>", np.float32, (1,), (1,),
                     (sumsq.astype(np.float32, copy=False), state, self._guard_or_open(guard), gate,
                      np.float32(growth), np.float32(backoff), np.int64(interval)))

    @_on_device
    def check_batch(self, X, y, loss, n_out, guard, step):
        kind = target_kind(y, loss)
        labels = y if kind == 0 else self._scratch("no_labels", (0,), np.int64)
        targets = X if kind == 0 else y  # unused with labels
        # a fixed grid for the size (4 elements a thread at least), so a batch is read at the memory's speed
        blocks = max(1, min(4 * self._sm_count, -(-(X.size + y.size) // (4 * cuda_sources.THREADS))))
        partial = self._scratch("check_batch", (blocks,), np.float64)
        self._launch("loss.cu", "check_batch<{T}, {ACT}>", X.dtype, (blocks,), (cuda_sources.THREADS,),
                     (X, np.int64(X.size), labels, targets, np.int64(y.size), np.int32(n_out), partial), act=kind)
        self._launch("loss.cu", "check_batch_finish<double, {ACT}>", np.float64, (1,), (cuda_sources.REDUCE_THREADS,),
                     (partial, np.int64(blocks), guard, np.int64(step)), act=kind)

    @_on_device
    def clip_by_norm(self, grad, sumsq, max_norm, guard=None):
        with self._in_place(grad.dtype, grad) as (x,):
            self._launch("optim.cu", "clip_by_norm<{T}>", x.dtype, (self._grid(x.size),), (cuda_sources.THREADS,),
                         (x, np.int64(x.size), sumsq.astype(self._acc_dtype(x.dtype), copy=False), np.float64(max_norm),
                          self._guard_or_open(guard)))

    @_on_device
    def sum_of_squares(self, x, out=None):
        x = self._flat_in(x, x.dtype)
        acc = self._acc_dtype(x.dtype)
        # A fixed function of the size (up to 256 blocks of at least 4 elements a thread), so the summation
        # order, and the bits, are the same at every step.
        blocks = max(1, min(256, -(-x.size // (4 * cuda_sources.THREADS))))
        partial = self._scratch("sumsq", (blocks,), acc)
        self._launch("optim.cu", "sumsq_partial<{T}>", x.dtype, (blocks,), (cuda_sources.THREADS,),
                     (x, np.int64(x.size), partial))
        out = self._out_scalar(out, acc)
        self._launch("loss.cu", "ordered_sum<{T}>", acc, (1,), (cuda_sources.REDUCE_THREADS,),
                     (partial, np.int64(blocks), acc(1.0), out))
        return out

    def warmup(self, dtypes: Any = ("float32", "float64"), activations: Any = None) -> float:
        """Compile (or load from CuPy's disk cache) the kernel modules; returns seconds."""
        import time

        start = time.perf_counter()
        with self.device:
            for file in cuda_sources.FILES:
                self._kernel(file, name_expressions(file)[0].replace("float", "{T}", 1), "float32")
        return time.perf_counter() - start


#: The dynamic shared memory any CUDA block may have without opting in.
SHARED_DEFAULT = 48 * 1024


def mlp_shared_bytes(sizes: list[int], dtype: Any, tile_rows: int, keeps_z: bool) -> int:
    """The dynamic shared memory of mlp.cu's fused pass over a network of widths ``sizes``, for tiles of
    ``tile_rows`` rows (the kernel's layout): every layer's output for the tile, the hidden layers' Z too
    where g' reads Z (``keeps_z``), one layer's [W; b], and two deltas."""
    widths, hidden = sum(sizes), sum(sizes[1:-1]) if keeps_z else 0
    weights = max((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    return np.dtype(dtype).itemsize * (tile_rows * (widths + hidden + 2 * max(sizes[1:])) + weights)


def _keeps_z(model: Any) -> bool:
    """Whether the hidden activation's g' reads Z (the fused pass then keeps every hidden layer's Z)."""
    return any(ACTIVATIONS[a].keeps == "preactivation" for a in model.activations[:-1])


def create(device_id: int = 0, cupy_module: Any = None) -> CupyBackend:
    """The backend on CUDA device ``device_id``, or BackendUnavailable saying why not. ``cupy_module``: as
    for CupyBackend (the real ``cupy`` by default)."""
    cupy = cupy_module
    if cupy is None:
        try:
            cupy = importlib.import_module("cupy")
        except ImportError as exc:
            raise BackendUnavailable(f"cupy is not installed ({exc}); pip install 'fastbp[cuda12]' or "
                                     f"'fastbp[cuda13]'") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, a driver too old for this CuPy, ...
        raise BackendUnavailable(f"no usable CUDA device: {exc}") from exc
    if count == 0:
        raise BackendUnavailable("no CUDA device found")
    if not 0 <= device_id < count:
        raise BackendUnavailable(f"CUDA device {device_id} does not exist; this machine has {count}")
    try:
        with cupy.cuda.Device(device_id):
            probe = cupy.arange(4, dtype=cupy.float32)
            float(probe.sum())
    except Exception as exc:
        raise BackendUnavailable(f"CUDA device {device_id} is present but a test allocation failed: {exc}") from exc
    try:
        kernel_dir()
    except FileNotFoundError as exc:
        raise BackendUnavailable(str(exc)) from exc
    return CupyBackend(device_id, cupy)
