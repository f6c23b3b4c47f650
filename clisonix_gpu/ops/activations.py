"""The activations of ``transform_matrix`` on the host, each with its gradient beside it.

Names and constants come from ``kernels/activation_table.py``, which the Triton epilogue
(``kernels/activations.py``) reads too. Per activation, :data:`TABLE` holds:

- ``numpy_``: the NumPy path's forward, applied in place in the output's precision (NaN
  propagates as in torch);
- ``torch``: torch's own function (the float64 reference and the benchmark peer use it);
- ``torch_``: the same function in place on a tensor (the CPU path's epilogue: no temporary);
- ``grad``: d activation(z) / dz elementwise on a torch tensor, for the backward of the torch op;
- ``grad_from_output``: the same derivative written in terms of the output ``y = activation(z)``
  where it can be (the backward then keeps ``y`` and needs neither ``z`` nor a second GEMM), else
  None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from scipy import special

from ..kernels.activation_table import ACTIVATIONS, GELU_TANH_CUBIC, INV_SQRT_2PI, LEAKY_RELU_SLOPE, SQRT_2_OVER_PI, SQRT_HALF

__all__ = ["ACTIVATIONS", "LEAKY_RELU_SLOPE", "TABLE", "Activation", "apply_activation_", "check_activation"]


class Activation(NamedTuple):
    """One activation's host implementations (see the module docstring)."""

    numpy_: Callable[[np.ndarray], Any]
    torch: Callable[[Any], Any]
    torch_: Callable[[Any], Any]
    grad: Callable[[Any], Any]
    grad_from_output: Callable[[Any], Any] | None = None


def _aten() -> Any:
    import torch

    return torch.ops.aten


def _functional() -> Any:
    # torch is imported on first use: ``import clisonix_gpu`` stays light for NumPy users
    import torch.nn.functional

    return torch.nn.functional


def _relu_numpy_(y: np.ndarray) -> None:
    y[y < 0] = 0


def _leaky_relu_numpy_(y: np.ndarray) -> None:
    np.multiply(y, LEAKY_RELU_SLOPE, out=y, where=y < 0)


def _leaky_relu_grad(z: Any) -> Any:
    grad = z.new_full(z.shape, LEAKY_RELU_SLOPE)
    return grad.masked_fill_(z > 0, 1.0)


def _gelu_numpy_(y: np.ndarray) -> None:
    y *= 0.5 * (1.0 + special.erf(y * SQRT_HALF))


def _gelu_grad(z: Any) -> Any:
    return 0.5 * (1.0 + (z * SQRT_HALF).erf()) + z * (-0.5 * z * z).exp() * INV_SQRT_2PI


def _gelu_tanh_numpy_(y: np.ndarray) -> None:
    y *= 0.5 * (1.0 + np.tanh(SQRT_2_OVER_PI * (y + GELU_TANH_CUBIC * y**3)))


def _gelu_tanh_grad(z: Any) -> Any:
    t = (SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z**3)).tanh()
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3 * GELU_TANH_CUBIC * z * z)


def _silu_numpy_(y: np.ndarray) -> None:
    y *= special.expit(y)


def _silu_grad(z: Any) -> Any:
    sig = z.sigmoid()
    return sig * (1.0 + z * (1.0 - sig))


def _sigmoid_numpy_(y: np.ndarray) -> None:
    special.expit(y, out=y)


def _sigmoid_grad(z: Any) -> Any:
    sig = z.sigmoid()
    return sig * (1.0 - sig)


def _sigmoid_grad_from_output(y: Any) -> Any:
    return y * (1.0 - y)


def _tanh_numpy_(y: np.ndarray) -> None:
    np.tanh(y, out=y)


def _tanh_grad(z: Any) -> Any:
    t = z.tanh()
    return 1.0 - t * t


def _tanh_grad_from_output(y: Any) -> Any:
    return 1.0 - y * y


def _relu_grad(z: Any) -> Any:
    return (z > 0).to(z.dtype)


TABLE: dict[str | None, Activation] = {
    None: Activation(lambda y: None, lambda z: z, lambda z: z, lambda z: z.new_ones(z.shape), lambda y: y.new_ones(y.shape)),
    # relu and leaky relu (positive slope): y > 0 exactly where z > 0, so the same function serves y
    "relu": Activation(_relu_numpy_, lambda z: _functional().relu(z), lambda z: z.relu_(), _relu_grad, _relu_grad),
    "leaky_relu": Activation(
        _leaky_relu_numpy_,
        lambda z: _functional().leaky_relu(z, LEAKY_RELU_SLOPE),
        lambda z: _functional().leaky_relu_(z, LEAKY_RELU_SLOPE),
        _leaky_relu_grad,
        _leaky_relu_grad,
    ),
    "gelu": Activation(_gelu_numpy_, lambda z: _functional().gelu(z), lambda z: _aten().gelu_(z), _gelu_grad),
    "gelu_tanh": Activation(
        _gelu_tanh_numpy_, lambda z: _functional().gelu(z, approximate="tanh"), lambda z: _aten().gelu_(z, approximate="tanh"), _gelu_tanh_grad
    ),
    "silu": Activation(_silu_numpy_, lambda z: _functional().silu(z), lambda z: _functional().silu(z, inplace=True), _silu_grad),
    "sigmoid": Activation(_sigmoid_numpy_, lambda z: z.sigmoid(), lambda z: z.sigmoid_(), _sigmoid_grad, _sigmoid_grad_from_output),
    "tanh": Activation(_tanh_numpy_, lambda z: z.tanh(), lambda z: z.tanh_(), _tanh_grad, _tanh_grad_from_output),
}
if tuple(TABLE) != ACTIVATIONS:  # a name added to the shared table needs its host implementations here
    raise ImportError(f"activation table out of step: host has {tuple(TABLE)}, kernels/activation_table.py has {ACTIVATIONS}")


def check_activation(activation: object) -> None:
    """``TypeError`` unless ``activation`` is a str or None; ``ValueError`` listing the valid names
    unless it is one of :data:`ACTIVATIONS`."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None; got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def apply_activation_(y: np.ndarray, activation: str | None) -> np.ndarray:
    """Apply ``activation`` to ``y`` in place and return it."""
    TABLE[activation].numpy_(y)
    return y
