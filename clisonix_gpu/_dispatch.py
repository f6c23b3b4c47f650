"""Backend layer: array-type detection, the (op, backend) dispatch table and backend choice.

Backends are peers behind one table, as in bitsandbytes' registry: every op registers one
implementation per backend with :func:`register`, and :func:`call` picks the backend from the
input arrays (or ``use_backend`` / ``CLISONIX_BACKEND``), converts the inputs to the arrays that
backend works on, runs the implementation and converts the results back to the caller's array
type and device.

=============  =====================================  ====================================
backend        works on                               serves (``auto``)
=============  =====================================  ====================================
``numpy``      ``numpy.ndarray``                      NumPy arrays, CPU torch tensors
``triton``     ``torch.Tensor`` (CUDA, or CPU under   CUDA torch tensors
               ``TRITON_INTERPRET=1``)
``cupy``       ``cupy.ndarray``; ops without a CuPy   CuPy arrays
               kernel run the Triton one via DLPack
=============  =====================================  ====================================
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import numpy as np

from ._environ import Setting
from .errors import BackendUnavailable
from .kernels._common import interpreter_enabled

BACKEND_NAMES = ("numpy", "triton", "cupy")
_CHOICES = ("auto",) + BACKEND_NAMES

_IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., Any]] = {}
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("clisonix_backend", default=None)


class BackendStatus(NamedTuple):
    """One row of :func:`backends`: ``reason`` says why an unusable backend cannot run.

    Example:

    >>> numpy_row = next(row for row in cg.backends() if row.name == "numpy")
    >>> numpy_row.usable, numpy_row.reason
    (True, '')
    """

    name: str
    usable: bool
    reason: str


_TAKES_CPU_TENSORS: set[str] = set()


def register(op: str, backend: str, *, takes_cpu_tensors: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``.

    ``takes_cpu_tensors`` (numpy backend only): CPU torch tensors reach ``fn`` as they are (the
    caller's objects, not detached: ``fn`` detaches what it computes on), for ops where torch's own
    CPU kernels beat a NumPy view.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLEMENTATIONS[(op, backend)] = fn
        if takes_cpu_tensors:
            _TAKES_CPU_TENSORS.add(op)
        return fn

    return wrap


# ----------------------------------------------------------------------------- array kinds


def array_kind(a: Any, name: str = "array") -> str:
    """``"numpy"``, ``"torch-cpu"``, ``"torch-cuda"`` or ``"cupy"``.

    ``TypeError`` naming ``name`` for anything else: ``None``, lists and scalars, ``np.matrix`` and
    masked arrays (whose ``*`` and mask NumPy's kernels would not honour), and torch tensors that
    hold no plain data (sparse or other non-strided layouts, the meta device, devices other than
    CPU and CUDA).
    """
    if isinstance(a, np.ndarray):
        if isinstance(a, np.matrix):
            raise TypeError(f"{name} is a numpy.matrix; pass np.asarray({name}) (a plain ndarray)")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name} is a masked array, whose mask the ops cannot honour; pass {name}.filled(value) or np.asarray({name})")
        return "numpy"
    module = type(a).__module__
    if module.startswith("torch"):
        import torch

        if isinstance(a, torch.Tensor):
            if a.layout != torch.strided:
                raise TypeError(f"{name} is a tensor of layout {a.layout}; pass a dense tensor ({name}.to_dense())")
            if a.device.type not in ("cpu", "cuda"):
                raise TypeError(f"{name} is on the {a.device.type} device; the ops take CPU or CUDA tensors holding data")
            return "torch-cuda" if a.device.type == "cuda" else "torch-cpu"
    if module.startswith("cupy"):
        return "cupy"
    got = "None" if a is None else f"{module}.{type(a).__qualname__}"
    raise TypeError(f"{name} must be a numpy.ndarray, torch.Tensor or cupy.ndarray; got {got}")


def dense_cpu_tensors(*arrays: Any) -> bool:
    """Whether every one of ``arrays`` that is not None is a plain dense CPU tensor: the common case
    of :func:`array_kind` for torch, checked in a fraction of its time on a hot path."""
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported
    if torch is None:
        return False
    plain, strided = (torch.Tensor, torch.nn.Parameter), torch.strided
    # ``is_cpu``, not ``device.type``: a device object is built on every read (about 1 us)
    return all(a is None or (type(a) in plain and a.layout == strided and a.is_cpu) for a in arrays)


def _device_of(a: Any) -> str:
    kind = array_kind(a)  # already checked by common_kind
    if kind == "numpy":
        return "cpu"
    if kind == "cupy":
        return f"cuda:{a.device.id}"
    return str(a.device)


def common_kind(names: tuple[str, ...], arrays: tuple[Any, ...], optional: tuple[str, ...] = ()) -> str:
    """The one array kind shared by all ``arrays``, each checked by :func:`array_kind` under its name.

    ``None`` is allowed (and skipped) only for the arguments named in ``optional``. Raises
    ``TypeError`` naming the argument for a missing or unsupported array, and when array types
    are mixed or tensors sit on different devices.
    """
    for n, a in zip(names, arrays):
        if a is None and n not in optional:
            raise TypeError(f"{n} must be a numpy.ndarray, torch.Tensor or cupy.ndarray; got None")
    present = [(n, a) for n, a in zip(names, arrays) if a is not None]
    kinds = {n: array_kind(a, n) for n, a in present}
    family = {k.split("-")[0] for k in kinds.values()}
    if len(family) > 1:
        listing = ", ".join(f"{n}: {k}" for n, k in kinds.items())
        raise TypeError(f"all arrays must be of one type (no mixing NumPy, torch and CuPy); got {listing}")
    devices = {n: _device_of(a) for n, a in present}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise TypeError(f"all arrays must be on one device; got {listing}")
    return next(iter(kinds.values()))


# ----------------------------------------------------------------------------- backend status


@functools.cache
def _cuda_device_count() -> int:
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _triton_reason() -> str:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install triton (CUDA builds of torch include it)"
    if _cuda_device_count() == 0 and not interpreter_enabled():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly)"
    return ""


@functools.cache
def _cupy_reason() -> str:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed: pip install 'clisonix-gpu[cuda]'"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        return f"CuPy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    return "" if count > 0 else "no CUDA device"


def _reason(backend: str) -> str:
    if backend == "numpy":
        return ""
    if backend == "triton":
        return _triton_reason()
    return _cupy_reason()


def backends() -> list[BackendStatus]:
    """Every backend, whether it is usable here, and for the unusable ones why not.

    >>> cg.backends()[0].name
    'numpy'
    """
    return [BackendStatus(name, not _reason(name), _reason(name)) for name in BACKEND_NAMES]


# ----------------------------------------------------------------------------- backend choice


def _validate_choice(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {_CHOICES}")
    return name


_BACKEND = Setting("CLISONIX_BACKEND", "auto")


def current_backend() -> str:
    """The requested backend: the innermost ``use_backend``, else ``CLISONIX_BACKEND``, else ``auto``.

    Example:

    >>> with cg.use_backend("numpy"):
    ...     cg.current_backend()
    'numpy'
    """
    requested = _requested.get()
    if requested is not None:
        return requested
    return _validate_choice(_BACKEND.get() or "auto", "CLISONIX_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run ops inside on ``name`` (``"numpy"``, ``"triton"``, ``"cupy"`` or ``"auto"``).

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailable` if it cannot run here.

    Example:

    >>> with cg.use_backend("numpy"):
    ...     cg.pack_bits(np.array([1.0, -1.0, 2.0])).tolist()
    [5]
    """
    _validate_choice(name, "use_backend")
    if name != "auto" and _reason(name):
        raise BackendUnavailable(f"backend {name!r} is not usable here: {_reason(name)}")
    token = _requested.set(name)
    try:
        yield
    finally:
        _requested.reset(token)


_AUTO = {"numpy": "numpy", "torch-cpu": "numpy", "torch-cuda": "triton", "cupy": "cupy"}


def select_backend(kind: str) -> str:
    """The backend that will run an op on arrays of ``kind``; ``BackendUnavailable`` if none can."""
    requested = current_backend()
    backend = _AUTO[kind] if requested == "auto" else requested
    reason = _reason(backend)
    if not reason and backend == "triton" and kind in ("numpy", "torch-cpu") and not interpreter_enabled():
        reason = "the arrays are on the CPU; move them to a CUDA device or set TRITON_INTERPRET=1"
    if not reason and backend == "cupy" and kind != "cupy":
        reason = "the cupy backend takes CuPy arrays; pass cupy.ndarray inputs"
    if reason:
        raise BackendUnavailable(f"backend {backend!r} cannot run these {kind} arrays: {reason}")
    return backend


# ----------------------------------------------------------------------------- conversions


def _torch_dtype_is_numpy_native(t: Any) -> bool:
    import torch

    return t.dtype not in (torch.bfloat16,)


def _to_numpy(a: Any, kind: str) -> np.ndarray:
    if kind == "numpy":
        return cast(np.ndarray, a)
    if kind == "cupy":
        import cupy

        return cast(np.ndarray, cupy.asnumpy(a))
    t = a.detach()
    if not _torch_dtype_is_numpy_native(t):
        t = t.float()  # NumPy has no bfloat16; every bfloat16 value is exact in float32
    # DLPack shares the memory as .numpy() does, without marking the caller's storage not resizable for good
    return cast(np.ndarray, np.from_dlpack(t.cpu()))


def _to_torch(a: Any, kind: str) -> Any:
    import torch

    if kind == "numpy":
        return torch.from_numpy(a)
    if kind == "cupy":
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(a)
    return a.detach()


def _restore(result: Any, kind: str, like: Any) -> Any:
    """Convert one backend result (array, tuple of arrays, or scalar) to ``like``'s type and device."""
    if isinstance(result, tuple):
        converted = [_restore(r, kind, like) for r in result]
        return type(result)(*converted) if hasattr(result, "_fields") else tuple(converted)
    if isinstance(result, np.ndarray):
        if kind == "numpy":
            return result
        if kind == "cupy":
            import cupy

            return cupy.asarray(result)
        import torch

        return torch.from_numpy(result).to(like.device)
    if type(result).__module__.startswith("torch"):
        if kind == "numpy":
            return result.cpu().numpy()
        if kind == "cupy":
            import cupy

            return cupy.from_dlpack(result)
        return result.to(like.device)
    return result


def call(op: str, names: tuple[str, ...], arrays: tuple[Any, ...], **params: Any) -> Any:
    """Run ``op`` on ``arrays`` with the chosen backend and return results in the caller's array type.

    ``names`` label the arrays in error messages; ``None`` arrays are passed through untouched.
    """
    kind = common_kind(names, arrays, optional=names)  # the op's own checks ran before
    backend = select_backend(kind)
    impl = _IMPLEMENTATIONS.get((op, backend))
    if impl is None and backend == "cupy":
        backend, impl = "triton", _IMPLEMENTATIONS.get((op, "triton"))  # zero-copy through DLPack
    if impl is None:
        raise BackendUnavailable(f"op {op!r} has no {backend!r} implementation")
    if backend == "numpy" and kind == "torch-cpu" and op in _TAKES_CPU_TENSORS:
        inputs = arrays
    else:
        convert = _to_numpy if backend == "numpy" else _to_torch
        inputs = tuple(None if a is None else convert(a, kind) for a in arrays)
    like = next(a for a in arrays if a is not None)
    return _restore(impl(*inputs, **params), kind, like)


def cast_like(out: Any, like: Any) -> Any:
    """``out`` cast to ``like``'s dtype (both of one array type); a no-op when they already agree."""
    if out.dtype == like.dtype:
        return out
    return out.to(like.dtype) if hasattr(out, "to") else out.astype(like.dtype)
