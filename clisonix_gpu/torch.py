"""PyTorch integration: every op declared once with ``torch.library`` under the namespace ``clisonix``.

Each op has a schema, a fake (meta) implementation for tracing, a CPU implementation (the NumPy /
torch-CPU path) and a CUDA implementation (the Triton kernels). ``transform_matrix`` is a
``triton_op`` whose kernel launch goes through ``wrap_triton``, so ``torch.compile`` sees into it,
and it is differentiable (backward as GEMMs). Call the functions of this module (or use
``clisonix_gpu.nn``) inside models; they work under ``torch.compile(fullgraph=True)``.

Not declared here: ``hamming_radius`` (its output size depends on the data) and
``svd_compress(tol=...)`` (so does its rank); ``svd_compress(k=...)`` is ``svd_compress_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import _dispatch
from .ops import binary as _binary
from .ops import svd_compress as _svd
from .ops import transform_matrix as _tm
from .ops.activations import TABLE as _ACTIVATIONS
from .ops.activations import check_activation
from .ops.utils import cdiv

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef

__all__ = [
    "binarize",
    "binary_matmul",
    "hamming_distance",
    "hamming_topk",
    "pack_bits",
    "svd_compress_k",
    "transform_matrix",
    "unpack_bits",
]


def _on_numpy_path(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tensor:
    with _dispatch.use_backend("numpy"):
        return cast(Tensor, fn(*args, **kwargs))


def _custom_op(name: str) -> Callable[[Callable[..., Any]], CustomOpDef]:
    """``torch.library.custom_op`` (no mutated arguments) that keeps the function's docstring on
    the op object, so ``help()`` and doctest see it."""

    def declare(fn: Callable[..., Any]) -> CustomOpDef:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.__doc__ = fn.__doc__
        return op

    return declare


def _one_device(**tensors: Tensor | None) -> None:
    """``TypeError`` naming the tensors unless they share one device. Fake kernels need it: torch
    sends any call with a meta tensor among CPU ones to them, which would hand back an
    uninitialised CPU tensor."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise TypeError("all tensors must be on one device; got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


# ----------------------------------------------------------------------------- transform_matrix


@_custom_op("clisonix::transform_matrix_cpu")
def _transform_matrix_cpu(x: Tensor, w: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """The CPU implementation (the CPU path of the dispatch table, called directly), opaque to tracing."""
    return cast(Tensor, _tm.transform_matrix_cpu_tensors(x, w, bias, activation or None))


def _transform_matrix_shape(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    _one_device(x=x, w=w, bias=bias)
    _tm.validate(x, w, bias, activation or None)
    return x.new_empty(tuple(x.shape[:-1]) + (w.shape[-2],))


_transform_matrix_cpu.register_fake(_transform_matrix_shape)


@triton_op("clisonix::transform_matrix", mutates_args=())
def _transform_matrix_op(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    # Tracing runs this body for every device, so the CPU case goes to an opaque op of its own
    # and only CUDA tensors (or CPU tensors under use_backend("triton") with the interpreter)
    # reach the Triton launch, which Inductor sees through wrap_triton.
    if x.device.type != "cuda" and _dispatch.select_backend("torch-cpu") != "triton":
        return cast(Tensor, _transform_matrix_cpu(x, w, bias, activation or ""))
    _tm.validate(x, w, bias, activation or None)
    return cast(Tensor, _tm.launch_transform_matrix(x, w, bias, activation or None, wrap=wrap_triton))


_transform_matrix_op.register_fake(_transform_matrix_shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, bias, activation = inputs
    # an activation whose derivative is a function of its output keeps the output: no GEMM to
    # recompute the pre-activation in backward
    keep_output = bool(activation) and _ACTIVATIONS[activation].backward_from_output is not None
    ctx.save_for_backward(x, w, bias, output if keep_output else None)
    ctx.activation = activation or None
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    x, w, bias, output = ctx.saved_tensors
    if ctx.activation:
        activation = _ACTIVATIONS[ctx.activation]
        if activation.backward_from_output is not None:
            grad = activation.backward_from_output(grad, output)
        else:  # the fused CUDA kernel and traced graphs keep no pre-activation: recompute it
            z = torch.matmul(x, w.transpose(-1, -2))
            if bias is not None:
                z = z + bias
            grad = activation.backward(grad, z)
    return _linear_backward(ctx, grad, x, w)


def _linear_backward(ctx: Any, grad: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    """Gradients of ``x @ w.T + bias`` given the gradient ``grad`` of that pre-activation: plain
    GEMMs (gradients need no batch invariance)."""
    grad_x = torch.matmul(grad, w) if ctx.needs_input_grad[0] else None
    grad_w = grad_b = None
    if ctx.needs_input_grad[1]:
        if w.ndim == 3:
            grad_w = torch.matmul(grad.transpose(-1, -2), x)
        else:
            grad_w = grad.reshape(-1, grad.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None


_transform_matrix_op.register_autograd(_backward, setup_context=_setup_context)


@_custom_op("clisonix::transform_matrix_cpu_keep_preactivation")
def _transform_matrix_cpu_keep(x: Tensor, w: Tensor, bias: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    """The CPU implementation returning ``(output, x @ w.T + bias)``, for training with an
    activation whose derivative needs its input (the output has the plain op's bits)."""
    out, preactivation = _tm.transform_matrix_cpu_tensors(x, w, bias, activation or None, keep_preactivation=True)
    return out, preactivation


@_transform_matrix_cpu_keep.register_fake
def _(x: Tensor, w: Tensor, bias: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    out = _transform_matrix_shape(x, w, bias, activation)
    return out, out.new_empty(out.shape)


def _keep_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, w, bias, activation = inputs
    ctx.save_for_backward(x, w, output[1])
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _keep_backward(ctx: Any, grad: Tensor, grad_preactivation: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    x, w, preactivation = ctx.saved_tensors
    grad = _ACTIVATIONS[ctx.activation or None].backward(grad, preactivation)
    if grad_preactivation is not None:
        grad = grad + grad_preactivation
    return _linear_backward(ctx, grad, x, w)


_transform_matrix_cpu_keep.register_autograd(_keep_backward, setup_context=_keep_setup_context)


def transform_matrix(x: Tensor, w: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``torch.ops.clisonix.transform_matrix``: :func:`clisonix_gpu.transform_matrix` as a
    differentiable, compilable torch op (same shapes, dtypes and errors).

    On CPU tensors that nothing records or traces, the call skips the op's dispatch and runs the CPU
    kernel directly (same bits). When autograd records it, ReLU, leaky ReLU, sigmoid and tanh keep
    their output for the backward, and on CPU the GELUs and SiLU keep their input; elsewhere
    the backward recomputes the pre-activation with one more GEMM.

    Example:

    >>> x, w = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8)
    >>> y = cg.torch.transform_matrix(x, w, None, "relu")
    >>> y.shape, bool(torch.allclose(y, torch.relu(x @ w.T), atol=1e-5))
    (torch.Size([5, 3]), True)
    >>> y.sum().backward()
    >>> x.grad.shape
    torch.Size([5, 8])
    """
    shortcut = _tm.layer_call_shortcut(x, w, bias, activation)
    if shortcut is not None:
        return cast(Tensor, shortcut)
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        if not isinstance(t, Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    activation = None if isinstance(activation, str) and not activation else activation  # the schema's "" is None
    check_activation(activation)
    # torch.compile traces the op itself (the backend switch below is a ContextVar dynamo cannot read)
    if not torch.compiler.is_compiling() and x.is_cpu and _dispatch.select_backend("torch-cpu") != "triton":
        route = _tm.torch_op_route(x, w, bias)
        if route is None and not _tm.modes_active(torch):
            return cast(Tensor, _tm.transform_matrix_cpu_tensors(x, w, bias, activation))
        if route == "autograd" and _ACTIVATIONS[activation].backward_from_output is None:
            return cast(Tensor, _transform_matrix_cpu_keep(x, w, bias, activation or "")[0])
    return cast(Tensor, _transform_matrix_op(x, w, bias, activation))


# ----------------------------------------------------------------------------- binary algebra
# Device-agnostic implementations: the dispatch table picks the Triton kernels for CUDA tensors.


@_custom_op("clisonix::pack_bits")
def pack_bits(x: Tensor) -> Tensor:
    """:func:`clisonix_gpu.pack_bits` as a torch op.

    Example:

    >>> cg.torch.pack_bits(torch.tensor([[1.0, -1.0, 2.0]])).tolist()
    [[5]]
    """
    return cast(Tensor, _binary.pack_bits(x))


@pack_bits.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(tuple(x.shape[:-1]) + (cdiv(x.shape[-1], 8),), dtype=torch.uint8)


@_custom_op("clisonix::unpack_bits")
def unpack_bits(bits: Tensor, n: int) -> Tensor:
    """:func:`clisonix_gpu.unpack_bits` as a torch op.

    Example:

    >>> cg.torch.unpack_bits(torch.tensor([[5]], dtype=torch.uint8), 3).tolist()
    [[1, 0, 1]]
    """
    return cast(Tensor, _binary.unpack_bits(bits, n))


@unpack_bits.register_fake
def _(bits: Tensor, n: int) -> Tensor:
    return bits.new_empty(tuple(bits.shape[:-1]) + (n,), dtype=torch.uint8)


@_custom_op("clisonix::binarize")
def binarize(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`clisonix_gpu.binarize` as a torch op: ``(bits, scale)``.

    Example:

    >>> bits, scale = cg.torch.binarize(torch.tensor([[0.5, -1.5, 2.0]]))
    >>> bits.tolist(), scale.tolist()
    ([[5]], [1.3333333730697632])
    """
    bits, scale = _binary.binarize(x)
    return bits, scale


@binarize.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (cdiv(x.shape[-1], 8),), dtype=torch.uint8), x.new_empty(lead)


def _binarize_setup(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
    (x,) = inputs
    ctx.save_for_backward(x)


def _binarize_backward(ctx: Any, grad_bits: Tensor, grad_scale: Tensor) -> Tensor:
    # the bits are piecewise constant (no gradient); scale = mean |x| over the last axis
    (x,) = ctx.saved_tensors
    grad_x: Tensor = grad_scale[..., None] * torch.sign(x) / max(x.shape[-1], 1)
    return grad_x


binarize.register_autograd(_binarize_backward, setup_context=_binarize_setup)


@_custom_op("clisonix::binary_matmul")
def binary_matmul(a: Tensor, b: Tensor, n: int) -> Tensor:
    """:func:`clisonix_gpu.binary_matmul` as a torch op.

    Example:

    >>> a = cg.torch.pack_bits(torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))
    >>> cg.torch.binary_matmul(a, a, 3).tolist()
    [[3, 1], [1, 3]]
    """
    return cast(Tensor, _binary.binary_matmul(a, b, n))


@binary_matmul.register_fake
def _(a: Tensor, b: Tensor, n: int) -> Tensor:
    _one_device(a=a, b=b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@_custom_op("clisonix::hamming_distance")
def hamming_distance(a: Tensor, b: Tensor) -> Tensor:
    """:func:`clisonix_gpu.hamming_distance` as a torch op.

    Example:

    >>> a = cg.torch.pack_bits(torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))
    >>> cg.torch.hamming_distance(a, a).tolist()
    [[0, 1], [1, 0]]
    """
    return cast(Tensor, _binary.hamming_distance(a, b))


@hamming_distance.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    _one_device(a=a, b=b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@_custom_op("clisonix::hamming_topk")
def hamming_topk(q: Tensor, db: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`clisonix_gpu.hamming_topk` as a torch op: ``(distances, indices)``.

    Example:

    >>> db = cg.torch.pack_bits(torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]))
    >>> distances, indices = cg.torch.hamming_topk(db[2:], db, 2)
    >>> distances.tolist(), indices.tolist()
    ([[0, 2]], [[2, 1]])
    """
    dist, idx = _binary.hamming_topk(q, db, k)
    return dist, idx


@hamming_topk.register_fake
def _(q: Tensor, db: Tensor, k: int) -> tuple[Tensor, Tensor]:
    _one_device(q=q, db=db)
    return q.new_empty((q.shape[0], k), dtype=torch.int32), q.new_empty((q.shape[0], k), dtype=torch.int64)


# ----------------------------------------------------------------------------- svd_compress


@_custom_op("clisonix::svd_compress_k")
def svd_compress_k(a: Tensor, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`clisonix_gpu.svd_compress` with a fixed rank, as a torch op: ``(u, s, vh)``.

    Example:

    >>> a = torch.randn(40, 4, dtype=torch.float64) @ torch.randn(4, 30, dtype=torch.float64)
    >>> u, s, vh = cg.torch.svd_compress_k(a, 4)
    >>> u.shape, s.shape, vh.shape, bool(torch.allclose(u @ torch.diag(s) @ vh, a))
    (torch.Size([40, 4]), torch.Size([4]), torch.Size([4, 30]), True)
    """
    lr = _svd.svd_compress(a, k, oversample=oversample, power_iters=power_iters, seed=seed)
    return lr.u.contiguous(), lr.s.contiguous(), lr.vh.contiguous()


@svd_compress_k.register_fake
def _(a: Tensor, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    lead, (m, n) = tuple(a.shape[:-2]), tuple(a.shape[-2:])
    return a.new_empty(lead + (m, k)), a.new_empty(lead + (k,)), a.new_empty(lead + (k, n))
