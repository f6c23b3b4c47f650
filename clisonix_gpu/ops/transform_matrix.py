"""``transform_matrix``: ``activation(x @ w.T + bias)``, the fused dense layer.

Host side of the op: validation, then one implementation per backend behind the dispatch table
(NumPy reference, Triton kernel; CuPy arrays reach the Triton kernel through DLPack).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _dispatch
from ..errors import ShapeError
from ._cpu_epilogue import apply_epilogue_
from ._dot_rows import DOT_ROWS, MAX_OUTPUTS, DotRows, dot_ok, dot_rows, dot_served, dot_transform_matrix
from ._exact_gemm import exact_matmul_blocks
from ._numba_gemm import Kernels, compiled_kernels
from ._packed_gemm import (
    PackedCase,
    low_rank_rows,
    packed_ok,
    packed_rows,
    packed_transform_matrix,
    plain_float32,
    ready_pack,
    release_packed_weights,
)
from ._tiled_gemm import TilePlan, call_settings, compute_dtype, cpu_gemm_mode, plan_for, tiled_transform_matrix
from ._validate import dtype_name, mantissa_bits, require_float
from .activations import ACTIVATIONS, apply_activation_, check_activation
from .utils import cdiv, interpreter_enabled, launch

__all__ = [
    "ACTIVATIONS",
    "launch_transform_matrix",
    "layer_call_shortcut",
    "low_rank_call_shortcut",
    "modes_active",
    "numpy_call_shortcut",
    "release_packed_weights",
    "torch_op_route",
    "transform_matrix",
    "transform_matrix_cpu_method",
    "validate",
]

# Rows of x handled by one exact GEMM on the NumPy path: bounds the float64 temporaries.
_NUMPY_ROW_BLOCK = 4096


def validate(x: Any, w: Any, bias: Any, activation: Any) -> None:
    """The checks of :func:`transform_matrix` (errors as documented there), without running it."""
    check_activation(activation)
    named = (("x", x), ("w", w)) if bias is None else (("x", x), ("w", w), ("bias", bias))
    for name, a in named:
        require_float(name, a)
    if x.dtype != w.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, w and bias must share one dtype; got { {name: dtype_name(a) for name, a in named} }")
    if x.ndim < 1 or w.ndim not in (2, 3):
        raise ShapeError(f"x must be (..., K) and w (N, K) or (B, N, K); got x {tuple(x.shape)} and w {tuple(w.shape)}")
    xs, ws = x.shape, w.shape  # compared as they are: building tuples costs more than the checks
    if xs[-1] != ws[-1]:
        raise ShapeError(f"x {tuple(xs)} and w {tuple(ws)} disagree on K (last dimension): {xs[-1]} != {ws[-1]}")
    if w.ndim == 3 and (x.ndim != 3 or xs[0] != ws[0]):
        raise ShapeError(f"batched w {tuple(ws)} needs x shaped (B, M, K) with the same B; got x {tuple(xs)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != ws[-2]):
        raise ShapeError(f"bias {tuple(bias.shape)} must be (N,) = ({ws[-2]},) for w {tuple(ws)}")


def transform_matrix(x: Any, w: Any, bias: Any = None, activation: str | None = None) -> Any:
    """``activation(x @ w.T + bias)`` with ``w`` laid out like ``torch.nn.Linear.weight``.

    Shapes: ``x`` (..., K) with ``w`` (N, K) gives (..., N); ``x`` (B, M, K) with ``w`` (B, N, K)
    gives (B, M, N); ``bias`` is (N,). Dtypes: float16, bfloat16 (torch), float32, float64, one
    dtype for all inputs; accumulation in float32 (float64 for float64) and output in ``x``'s dtype.
    ``activation``: None, "relu", "leaky_relu" (slope 0.01), "gelu", "gelu_tanh", "silu",
    "sigmoid" or "tanh". Row i of the result depends only on row i of ``x``, bit for bit.

    On torch tensors it is differentiable and traceable: when autograd records (an input requires
    grad), under ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` / ``torch.vmap``, and
    for tensor subclasses (fake tensors), the call goes through the torch op
    :func:`clisonix_gpu.torch.transform_matrix` (same results, plus a backward).

    Raises ``ShapeError`` (shapes named), ``TypeError`` (``x``/``w`` missing or not an array,
    dtype, mixed array types or devices, activation not a str),
    ``ValueError`` (unknown activation), ``BackendUnavailable``.

    >>> import numpy as np
    >>> cg.transform_matrix(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), activation="relu").shape
    (2, 4)
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> cg.transform_matrix(x, torch.ones(4, 3)).sum().backward()
    >>> x.grad.tolist()
    [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    shortcut = numpy_call_shortcut(x, w, bias, activation) if type(x) is np.ndarray else layer_call_shortcut(x, w, bias, activation)
    if shortcut is not None:
        return shortcut
    route = torch_op_route(x, w, bias)
    if route is None and x is not None and w is not None and _dispatch.dense_cpu_tensors(x, w, bias) and _cpu_backend_requested():
        return _checked_cpu_tensors(x, w, bias, activation, False)  # what the dispatch table picks, without its layers
    if route == "traced":  # the fake kernel validates on the traced shapes
        return _torch_op(x, w, bias, activation)
    _dispatch.common_kind(("x", "w", "bias"), (x, w, bias), optional=("bias",))
    validate(x, w, bias, activation)
    if route == "autograd":
        return _torch_op(x, w, bias, activation)
    out = _dispatch.call("transform_matrix", ("x", "w", "bias"), (x, w, bias), activation=activation)
    return _dispatch.cast_like(out, x)


def torch_op_route(*arrays: Any) -> str | None:
    """``"traced"``, ``"autograd"`` or None: whether these arrays (None entries skipped), if torch
    tensors, must take the torch op (None for NumPy/CuPy arrays and for torch tensors nothing
    records or traces).

    The torch op's own CPU and CUDA kernels run with autograd off and outside tracing, so their
    calls back into this function take the dispatch path (no recursion).
    """
    torch = sys.modules.get("torch")  # no torch tensor can exist before torch is imported
    if torch is None:
        return None
    plain = (torch.Tensor, torch.nn.Parameter)
    present = [a for a in arrays if a is not None]
    if not present or any(type(a) not in plain for a in present):
        if not present or not all(isinstance(a, torch.Tensor) for a in present):
            return None  # NumPy/CuPy, or mixed types: the dispatch path names the mix
        return "traced"  # fake, functional or user tensor subclasses: torch's dispatch handles them
    return _recording_route(torch, present)


def _recording_route(torch: Any, tensors: Any) -> str | None:
    """:func:`torch_op_route` for plain tensors: ``"traced"`` under ``torch.compile``,
    ``torch.jit`` tracing or functorch, ``"autograd"`` when autograd records one of ``tensors``."""
    if _tracing(torch):
        return "traced"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd"
    return None


def layer_call_shortcut(x: Any, w: Any, bias: Any, activation: Any) -> Any:
    """The result of a layer's usual call on CPU tensors, or None where this call is not one.

    A layer's usual call: float32 CPU tensors, ``x`` (M, K) contiguous with M >= 1, ``w`` (N, K)
    contiguous with its pack cached and unchanged, ``bias`` (N,) or None, a valid activation;
    nothing records, traces or intercepts it (autograd, ``torch.compile``, ``torch.jit``, functorch,
    torch function or dispatch modes); the CPU backend in use. Then it is the packed GEMM and the
    epilogue, without the general path's layers (about 20 us a call less). Any other call returns
    None and takes the general path, which gives the same bits (same pack, GEMM and epilogue),
    makes the pack on a first call and raises the documented errors."""
    torch = sys.modules.get("torch")  # no torch tensor can exist before torch is imported
    if torch is None or x is None or w is None:
        return None
    settings = _usual_call(torch, x, (w,), bias, activation)
    if settings is None:
        return None
    ready = _ready_gemm(w, settings, compiled_kernels())
    if ready is None:
        return None
    out = _layer_rows(x, w, ready, bias)
    apply_epilogue_(out, None, activation)
    return out


def low_rank_call_shortcut(x: Any, first: Any, second: Any, bias: Any, activation: Any) -> Any:
    """:func:`layer_call_shortcut` for a low-rank layer's two GEMMs, ``(x @ first.T) @ second.T``
    with ``bias`` and ``activation`` on the second, its checks made once: ``first`` (r, K) and
    ``second`` (N, r), each with its pack cached and unchanged. The bits of the two calls through
    the general path; None for any call that is not a layer's usual call."""
    torch = sys.modules.get("torch")
    if torch is None or x is None or first is None or second is None:
        return None
    settings = _usual_call(torch, x, (first, second), bias, activation)
    if settings is None:
        return None
    kernels = compiled_kernels()
    # both GEMMs ready, or neither runs here: the general path does them
    first_ready = _ready_gemm(first, settings, kernels)
    if first_ready is None:
        return None
    second_ready = _ready_gemm(second, settings, kernels)
    if second_ready is None:
        return None
    out = None if kernels is None else low_rank_rows(x, first, first_ready, second, second_ready, bias, kernels)
    if out is None:
        # the hidden rows keep the products of their padding, if any: the second GEMM takes them
        # in calls that need none
        out = _layer_rows(_layer_rows(x, first, first_ready, padded=True), second, second_ready, bias)
        out = out if out.shape[0] == x.shape[0] else out[: x.shape[0]]
    apply_epilogue_(out, None, activation)
    return out


def _usual_call(torch: Any, x: Any, weights: tuple[Any, ...], bias: Any, activation: Any) -> tuple[int, str] | None:
    """The checks of a layer's usual call that the tensor shortcuts share: ``x`` a plain, dense,
    contiguous float32 CPU tensor (:func:`plain_float32`) of shape (M, K), M >= 1, not a negative
    view (``z.conj().imag``: its memory holds the unnegated values); ``weights`` plain tensors that
    chain, (R, K) then (N, R) (the rest of that :func:`ready_pack` establishes from their cache
    entries); ``bias`` a plain float32 CPU tensor (N,) (any strides) or None; a valid activation;
    nothing records, traces or intercepts the call; the CPU backend in use and the packed method
    allowed. Returns the call's settings (``call_settings()``), or None where a check fails.

    A layer's call is short next to the work around it in a model, and every call into Python or
    torch counts there (in a model, between MKL's kernels, the checks run several times slower than
    alone in a loop: on a 2-core VM they cost a low-rank layer about a third of an ``nn.Linear``
    model's time), so each fact is read once a call, with few function calls."""
    plain = (torch.Tensor, torch.nn.Parameter)
    if type(x) not in plain or not plain_float32(x) or not _valid_activation(activation):  # a plain tensor: the shortcuts' x
        return None
    shape = x.shape
    if len(shape) != 2 or not shape[0]:
        return None
    width = shape[1]
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    for w in weights:
        if type(w) not in plain or (grad and w.requires_grad):
            return None
        shape = w.shape
        if len(shape) != 2 or shape[1] != width:
            return None
        width = shape[0]
    if bias is not None:
        if type(bias) not in plain or bias.dtype != torch.float32 or not bias.is_cpu or bias.layout != torch.strided or (grad and bias.requires_grad):
            return None
        if bias.shape != (width,):
            return None
    if _tracing(torch) or modes_active(torch) or not _cpu_backend_requested() or cpu_gemm_mode() != "auto":
        return None
    if x.is_neg():  # after the tracing checks: torch.compile cannot trace ``is_neg``
        return None
    return call_settings()


def numpy_call_shortcut(x: Any, w: Any, bias: Any, activation: Any) -> Any:
    """:func:`layer_call_shortcut` for NumPy arrays: float32 C-contiguous ``x`` (M, K), ``w``
    (N, K) with its pack cached and unchanged, ``bias`` (N,) or None (about 40 us a call less than
    the general path); None for any other call."""
    torch = sys.modules.get("torch")
    if (
        torch is None
        or w is None
        or not _plain_float32_arrays(x, w, bias)
        or not _layer_shapes(x, w, bias)
        or not _valid_activation(activation)
        or not _cpu_backend_requested()
        or cpu_gemm_mode() != "auto"
    ):
        return None
    ready = _ready_gemm(w, call_settings(), compiled_kernels())
    if ready is None:
        return None
    out = _layer_rows(torch.from_numpy(x), torch.from_numpy(w), ready, None if bias is None else torch.from_numpy(bias))
    apply_epilogue_(out, None, activation)
    return out.numpy()


def _cpu_backend_requested() -> bool:
    """The backend in use lets the CPU path run: ``auto`` or ``numpy``."""
    return _dispatch.current_backend() in ("auto", "numpy")


def _valid_activation(activation: Any) -> bool:
    return activation is None or (type(activation) is str and activation in ACTIVATIONS)


def _layer_shapes(x: Any, w: Any, bias: Any) -> bool:
    """``x`` (M, K) with M >= 1, ``w`` (N, K), ``bias`` (N,) or None."""
    return (
        x.ndim == 2
        and x.shape[0] > 0
        and w.ndim == 2
        and w.shape[1] == x.shape[1]
        and (bias is None or (bias.ndim == 1 and bias.shape[0] == w.shape[0]))
    )


def _plain_float32_arrays(x: Any, w: Any, bias: Any) -> bool:
    """``x``, ``w`` and ``bias`` (or None) are plain C-contiguous float32 NumPy arrays."""
    return all(a is None or (type(a) is np.ndarray and plain_float32(a)) for a in (x, w, bias))


def _ready_gemm(w: Any, settings: tuple[int, str], kernels: Kernels | None) -> Any:
    """How a layer shortcut runs ``x @ w.T`` for ``w`` (N, K), a plain tensor or array: ``"dot
    rows"`` for a plain float32 ``w`` (:func:`plain_float32`, not a negative view) in a case the
    dot-product method serves (:mod:`._dot_rows`: ``kernels`` compiled, its check passed), else
    the (case, pack) :func:`ready_pack` finds; None where neither holds (the general path runs the
    call). ``kernels``: :func:`._numba_gemm.compiled_kernels`, read once a call."""
    n, k = w.shape
    if n <= MAX_OUTPUTS and kernels is not None and dot_served(k, n):
        # read in place: plain float32 memory, not a negative view (whose memory holds the
        # unnegated values)
        return DOT_ROWS if plain_float32(w) and (type(w) is np.ndarray or not w.is_neg()) else None
    return ready_pack(w, settings)


def _layer_rows(x: Any, w: Any, ready: Any, bias: Any = None, *, padded: bool = False) -> Any:
    """``x @ w.T + bias`` as :func:`_ready_gemm` found it ready (``padded``: see
    :func:`._packed_gemm.packed_rows`; the dot products never pad)."""
    if ready is DOT_ROWS:
        return dot_rows(x, w, bias)
    case, pack = ready
    return packed_rows(x, pack, w, case, bias=bias, padded=padded)


def modes_active(torch: Any) -> bool:
    """A torch function or dispatch mode (``torch.device`` context, fake or debug modes) is on."""
    return bool(torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack())


def _tracing(torch: Any) -> bool:
    """``torch.compile``, ``torch.jit`` tracing or a functorch transform is on."""
    return bool(torch.compiler.is_compiling() or torch._C._is_tracing() or _functorch_probe()())


@functools.cache
def _functorch_probe() -> Callable[[], bool]:
    """Whether a ``torch.vmap`` / ``torch.func`` transform is on (its tensors are wrappers without
    storage): torch's own probe, private, or one that says no where this torch lacks it."""
    import torch

    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _torch_op(x: Any, w: Any, bias: Any, activation: Any) -> Any:
    from ..torch import transform_matrix as differentiable_transform_matrix

    return differentiable_transform_matrix(x, w, bias, activation)


# ----------------------------------------------------------------------------- CPU backend ("numpy")
# NumPy arrays and CPU torch tensors. With torch installed, a case whose tile check passes runs on
# torch's BLAS in fixed row tiles (``_tiled_gemm``); the others, and every case without torch, run
# the exact float64 GEMM (``_exact_gemm``). One case never mixes the two: the plan is per case.


@functools.cache
def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def transform_matrix_cpu_method(k: int, n: int, dtype: Any = "float32") -> str:
    """Which method the CPU path uses for ``transform_matrix`` with ``w`` (N, K) of ``dtype``
    under torch's current thread count, as one line of text.

    ``dtype``: a NumPy or torch dtype or its name. The first call for a case runs the checks
    (a few GEMMs of that shape) and caches the answer, as the op itself does.
    ``CLISONIX_CPU_GEMM=tiles`` skips the packed-weight method, ``CLISONIX_CPU_GEMM=exact`` sends
    every case to the exact path.

    Example:

    >>> cg.transform_matrix_cpu_method(256, 128, "float32")  # doctest: +ELLIPSIS
    'MKL packed GEMM, w packed once per weight... (checked for K=256, N=128, float32, ... threads)'
    """
    if not _torch_available():
        return "exact float64 slices (torch is not installed: no BLAS path)"
    import torch

    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else np.dtype(dtype).name
    compute = compute_dtype(getattr(torch, name))
    checked = f"checked for K={k}, N={n}, {str(compute).removeprefix('torch.')}, {torch.get_num_threads()} threads"
    method = _blas_method(k, n, compute)
    if isinstance(method, TilePlan):
        return f"BLAS on fixed {'/'.join(map(str, method.sizes))}-row tiles ({checked})"
    if isinstance(method, DotRows):
        return f"compiled dot products, one per output, vectorized over K ({checked})"
    if method is not None:
        padded = f", calls padded to a multiple of {method.row_multiple} rows" if method.row_multiple > 1 else ""
        if method.row_kernel_kc:
            padded += f" (fewer through the row kernel, K in blocks of {method.row_kernel_kc})"
        return f"MKL packed GEMM, w packed once per weight{padded} ({checked})"
    if cpu_gemm_mode() == "exact":
        return "exact float64 slices (CLISONIX_CPU_GEMM=exact)"
    return f"exact float64 slices (BLAS failed the checks for {checked.removeprefix('checked for ')})"


def _exact_cpu(
    x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, activation: str | None, keep_preactivation: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact path on one (M, K) x (N, K) problem: ``(output, preactivation or None)``,
    float32 (float64 for float64)."""
    out_dtype = np.float64 if x.dtype == np.float64 else np.float32
    out = np.empty((x.shape[0], w.shape[0]), dtype=out_dtype)
    for start, block in exact_matmul_blocks(x, w, mantissa_bits(x), _NUMPY_ROW_BLOCK):
        if bias is not None:
            block += bias
        # activation in the output precision, as the GPU epilogue does after its fp32 accumulation
        out[start : start + _NUMPY_ROW_BLOCK] = block
    preactivation = out.copy() if keep_preactivation else None
    apply_activation_(out, activation)
    return out, preactivation


def _as_numpy(a: Any) -> Any:
    if a is None or isinstance(a, np.ndarray):
        return a
    import torch

    # bfloat16 is exact in float32; DLPack, not .numpy(), which marks the storage not resizable for good
    return np.from_dlpack((a.float() if a.dtype == torch.bfloat16 else a).detach().resolve_neg())


def _as_torch(a: Any) -> Any:
    """A CPU tensor of ``a`` (NumPy arrays shared where contiguous), float16/bfloat16 widened to
    float32: the tiled path accumulates and runs the epilogue in float32, as the GPU kernel does."""
    import torch

    if a is None:
        return None
    # a negative view (``z.conj().imag``) holds the unnegated values: the BLAS methods read memory
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.resolve_neg()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _transform_matrix_2d(x: Any, w: Any, bias: Any, activation: str | None, keep_preactivation: bool, source: Any = None) -> tuple[Any, Any]:
    """One (M, K) x (N, K) problem of NumPy arrays or CPU tensors: ``(output, preactivation)``, the
    second None unless ``keep_preactivation``; same array type back, float32 for float16/bfloat16
    input (the caller casts). ``source``: the weight as the caller passed it (default ``w``), the
    packed-weight cache's key."""
    if _torch_available():
        source = w if source is None else source
        if not isinstance(source, np.ndarray) and source.is_neg():
            source = None  # a fresh resolved copy every call: never cached (its proof reads memory)
        w_blas = _as_torch(w)
        found = _blas_2d(_as_torch(x), w_blas, _as_torch(bias), activation, keep_preactivation, w_blas if source is None else source)
        if found is not None:
            out, pre = found
            return (out.numpy(), None if pre is None else pre.numpy()) if isinstance(x, np.ndarray) else (out, pre)
    out, pre = _exact_cpu(_as_numpy(x), _as_numpy(w), _as_numpy(bias), activation, keep_preactivation)
    if isinstance(x, np.ndarray):
        return out, pre
    import torch

    return torch.from_numpy(out), None if pre is None else torch.from_numpy(pre)


def _blas_method(k: int, n: int, dtype: Any) -> DotRows | PackedCase | TilePlan | None:
    """The method serving this case, in order of preference: dot products for at most 15 outputs,
    packed weights (what their check established), row tiles (their plan), or None where none does
    (checks failed, or ``CLISONIX_CPU_GEMM``)."""
    return dot_ok(k, n, dtype) or packed_ok(k, n, dtype) or plan_for(k, n, dtype)


def _blas_2d(x: Any, w: Any, bias: Any, activation: str | None, keep_preactivation: bool, source: Any) -> tuple[Any, Any] | None:
    """The BLAS method of this case on float32/float64 tensors; None where none serves it."""
    method = _blas_method(x.shape[1], w.shape[0], x.dtype)
    if isinstance(method, TilePlan):
        return tiled_transform_matrix(x, w, bias, activation, method, keep_preactivation)
    if isinstance(method, DotRows):
        return dot_transform_matrix(x, w, bias, activation, keep_preactivation)
    if method is not None:
        return packed_transform_matrix(x, w, bias, activation, source, method, keep_preactivation)
    return None


def transform_matrix_cpu_tensors(x: Any, w: Any, bias: Any, activation: str | None, *, keep_preactivation: bool = False) -> Any:
    """:func:`transform_matrix` for CPU torch tensors without the dispatch layer (the torch op's
    CPU kernel): checks, the CPU path, the result in ``x``'s dtype. With ``keep_preactivation``,
    ``(output, x @ w.T + bias)``: the output has the same bits as without it."""
    if x is None or w is None or not _dispatch.dense_cpu_tensors(x, w, bias):  # the general check names what is wrong
        _dispatch.common_kind(("x", "w", "bias"), (x, w, bias), optional=("bias",))
    return _checked_cpu_tensors(x, w, bias, activation, keep_preactivation)


def _checked_cpu_tensors(x: Any, w: Any, bias: Any, activation: str | None, keep_preactivation: bool) -> Any:
    """:func:`transform_matrix_cpu_tensors` on tensors known to be dense CPU tensors."""
    import torch

    validate(x, w, bias, activation)
    source = w
    x, w = _no_grad(x), _no_grad(w)
    bias = None if bias is None else _no_grad(bias)
    if x.ndim == 2 and w.ndim == 2 and x.dtype in (torch.float32, torch.float64):
        # a layer's call: one 2-D problem in the output dtype, without the batch path's reshapes and casts
        out, pre = _transform_matrix_2d(x, w, bias, activation, keep_preactivation, source)
        return (out, pre) if keep_preactivation else out
    out, pre = _cpu_path(x, w, bias, activation, keep_preactivation, source)
    if keep_preactivation:
        return _dispatch.cast_like(out, x), _dispatch.cast_like(pre, x)
    return _dispatch.cast_like(out, x)


def _no_grad(t: Any) -> Any:
    """``t`` without autograd history (detached only where it has one: a detach costs 0.5 us)."""
    return t.detach() if t.requires_grad else t


@_dispatch.register("transform_matrix", "numpy", takes_cpu_tensors=True)
def _transform_matrix_cpu(x: Any, w: Any, bias: Any, *, activation: str | None) -> Any:
    if isinstance(x, np.ndarray):
        return _cpu_path(x, w, bias, activation, keep_preactivation=False)[0]
    return _cpu_path(_no_grad(x), _no_grad(w), None if bias is None else _no_grad(bias), activation, keep_preactivation=False, source=w)[0]


def _cpu_path(x: Any, w: Any, bias: Any, activation: str | None, keep_preactivation: bool, source: Any = None) -> tuple[Any, Any]:
    """NumPy arrays or CPU tensors of any batch shape: ``(output, preactivation or None)``;
    ``source``: the 2-D weight as the caller passed it (default ``w``)."""
    k, n = w.shape[-1], w.shape[-2]
    if w.ndim == 2:
        out, pre = _transform_matrix_2d(x.reshape(math.prod(x.shape[:-1]), k), w, bias, activation, keep_preactivation, source)
        shape = tuple(x.shape[:-1]) + (n,)
        return out.reshape(shape), None if pre is None else pre.reshape(shape)
    parts = [_transform_matrix_2d(x[b], w[b], bias, activation, keep_preactivation) for b in range(w.shape[0])]
    stack: Any
    if isinstance(x, np.ndarray):
        stack = np.stack

        def empty() -> Any:
            return np.empty(x.shape[:-1] + (n,), np.float64 if x.dtype == np.float64 else np.float32)
    else:
        import torch

        stack = torch.stack

        def empty() -> Any:
            return x.new_empty(tuple(x.shape[:-1]) + (n,), dtype=_as_torch(x[:0]).dtype)

    if not parts:
        return empty(), empty() if keep_preactivation else None
    return stack([out for out, _ in parts]), stack([pre for _, pre in parts]) if keep_preactivation else None


# ----------------------------------------------------------------------------- Triton backend

# The reduction step over K per dtype: fixed by the host (never tuned), so a row's sum runs in the
# same steps whichever tile the autotuner picks and whichever rows share it.
BLOCK_K = {"float16": 64, "bfloat16": 64, "float32": 32, "float64": 16}


def launch_transform_matrix(x: Any, w: Any, bias: Any, activation: str | None, *, wrap: Any = None) -> Any:
    """Run the Triton kernel on torch tensors that passed :func:`validate`; returns (..., N).

    ``wrap`` (``torch.library.wrap_triton`` in ``clisonix_gpu.torch``) wraps the kernel before the
    launch so a tracer sees it; the default launches it directly. Inputs need unit stride along
    K only (others are copied); fp32 operands use tf32 where ``torch.backends.cuda.matmul.allow_tf32``.
    """
    import torch

    from ..kernels.transform_matrix import transform_matrix_kernel

    k, n = w.shape[-1], w.shape[-2]
    lead = x.shape[:-1]
    x3, w3 = (x, w) if w.ndim == 3 else (x.reshape(1, math.prod(lead), k), w.unsqueeze(0))
    x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
    w3 = w3 if w3.stride(-1) == 1 else w3.contiguous()
    bias = None if bias is None else bias.contiguous()
    batches, m = x3.shape[0], x3.shape[1]
    out = torch.empty((batches, m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.reshape(lead + (n,))
    name = dtype_name(x)
    precision = "tf32" if name == "float32" and torch.backends.cuda.matmul.allow_tf32 else "ieee"

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), batches)

    launch(transform_matrix_kernel, grid,
           x3, w3, x3 if bias is None else bias, out, m, n, k,
           x3.stride(0), x3.stride(1), w3.stride(0) if w.ndim == 3 else 0, w3.stride(1), out.stride(0), out.stride(1),
           on=x, wrap=wrap,
           HAS_BIAS=bias is not None, ACTIVATION=activation or "", DOT_PRECISION=precision,
           INTERPRETER_DOT=interpreter_enabled(), ACC_FP64=name == "float64", BLOCK_K=BLOCK_K[name])  # fmt: skip
    return out.reshape(lead + (n,))


@_dispatch.register("transform_matrix", "triton")
def _transform_matrix_triton(x: Any, w: Any, bias: Any, *, activation: str | None) -> Any:
    return launch_transform_matrix(x, w, bias, activation)
