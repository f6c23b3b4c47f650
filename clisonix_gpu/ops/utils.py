"""Launch helpers shared by every host-side launcher of a Triton kernel.

- :func:`cdiv`: blocks needed to cover a size (grids, packed widths);
- :func:`launch`: run a Triton kernel on its tensors' device with the project's compile options;
- :func:`launch_cuda`: run a CUDA C kernel of ``kernels/*.cu`` through CuPy on its arrays' device;
- :func:`interpreter_enabled`: whether Triton runs on the CPU interpreter (``TRITON_INTERPRET=1``);
- :func:`cpu_workers`: the threads that run CPU work in pieces (hashes, compiled kernels that release the GIL);
- :func:`float32_rows`: an uninitialized (rows, n) float32 CPU tensor, the CPU methods' outputs.

Every Triton launch goes through :func:`launch`, so it always runs inside the tensors' CUDA device
context (not the current device) and with :data:`FP_FUSION` set explicitly: Triton 3.9 warns that
its default for multiply-add contraction changes in 3.10, and a kernel's bits must not change
with the Triton version. (Under ``torch.compile`` a kernel launched through ``wrap_triton`` is
compiled by Inductor with the options it chooses.)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..kernels._common import interpreter_enabled

__all__ = ["FP_FUSION", "cdiv", "cpu_workers", "cuda_module", "device_context", "float32_rows", "interpreter_enabled", "launch", "launch_cuda"]

# Multiply-add contraction (FMA) in every kernel: one rounding per multiply-add, as cuBLAS does.
FP_FUSION = True


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints, without floats."""
    return -(-a // b)


def cpu_workers(threads: int) -> ThreadPoolExecutor:
    """``threads`` worker threads of this process for CPU work in pieces (a forked child has none of
    its parent's threads, so it gets its own)."""
    return _workers(threads, os.getpid())


@functools.cache
def _workers(threads: int, pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="clisonix-cpu")


def float32_rows(rows: int, n: int) -> Any:
    """An uninitialized (rows, n) float32 tensor on the CPU, whatever the default dtype or a
    ``torch.device`` context says (dtype and device given, the device as an object: a string costs
    half a microsecond more to parse, a tenth of a small layer's call)."""
    import torch

    return torch.empty(rows, n, dtype=torch.float32, device=_cpu_device())


@functools.cache
def _cpu_device() -> Any:
    import torch

    return torch.device("cpu")


def device_context(t: Any) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op context otherwise."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(t.device)


def launch(kernel: Any, grid: Any, *args: Any, on: Any, wrap: Callable[[Any], Any] | None = None, **constexprs: Any) -> None:
    """Launch Triton ``kernel[grid](*args, **constexprs)`` on the device of tensor ``on``.

    ``grid`` is a tuple or a function of the chosen config's meta-parameters (autotuned kernels).
    ``wrap`` (e.g. ``torch.library.wrap_triton``) wraps the kernel first so a tracer sees it.
    """
    options = {"enable_fp_fusion": FP_FUSION}
    if wrap is not None:
        kernel = wrap(kernel)
        import torch

        if torch.compiler.is_compiling():
            options = {}  # a traced launch is compiled by Inductor, which passes its own compile options
    with device_context(on):
        kernel[grid](*args, **options, **constexprs)


@functools.cache
def cuda_module(name: str) -> Any:
    """``cupy.RawModule`` of the CUDA C source ``kernels/<name>.cu``; CuPy compiles it on first use per device."""
    import cupy

    source = importlib.resources.files("clisonix_gpu.kernels").joinpath(f"{name}.cu").read_text()
    return cupy.RawModule(code=source, options=("--std=c++17",))


def launch_cuda(module: str, kernel: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], *, on: Any) -> None:
    """Launch CUDA C ``kernel`` of ``kernels/<module>.cu`` through CuPy on the device of CuPy array ``on``.

    Scalar ``args`` must carry the C signature's types (``np.int32``, ``np.int64``).
    """
    with on.device:
        cuda_module(module).get_function(kernel)(grid, block, args)
