"""The activations of ``transform_matrix`` on the host, each with its backward beside it.

Names and constants come from ``kernels/activation_table.py``, which the Triton epilogue
(``kernels/activations.py``) reads too. Per activation, :data:`TABLE` holds:

- ``numpy_``: the NumPy path's forward, applied in place in the output's precision (NaN
  propagates as in torch);
- ``torch``: torch's own function (the float64 reference and the benchmark peer use it);
- ``torch_``: the same function in place on a tensor (the CPU path's epilogue: no temporary);
- ``backward``: ``(grad, z) -> grad * activation'(z)``, torch's own fused backward kernel (one
  pass, as autograd of ``torch`` runs it), for the backward of the torch op;
- ``backward_from_output``: the same product taken from the output ``y = activation(z)`` where
  torch's kernel can (the backward then keeps ``y`` and needs neither ``z`` nor a second GEMM),
  else None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from scipy import special

from ..kernels.activation_table import ACTIVATIONS, GELU_TANH_CUBIC, LEAKY_RELU_SLOPE, SQRT_2_OVER_PI, SQRT_HALF

__all__ = ["ACTIVATIONS", "LEAKY_RELU_SLOPE", "TABLE", "Activation", "apply_activation_", "check_activation"]


class Activation(NamedTuple):
    """One activation's host implementations (see the module docstring)."""

    numpy_: Callable[[np.ndarray], Any]
    torch: Callable[[Any], Any]
    torch_: Callable[[Any], Any]
    backward: Callable[[Any, Any], Any]
    backward_from_output: Callable[[Any, Any], Any] | None = None


def _aten() -> Any:
    # torch is imported on first use: ``import clisonix_gpu`` stays light for NumPy users
    import torch

    return torch.ops.aten


def _functional() -> Any:
    import torch.nn.functional

    return torch.nn.functional


def _relu_numpy_(y: np.ndarray) -> None:
    y[y < 0] = 0


def _leaky_relu_numpy_(y: np.ndarray) -> None:
    np.multiply(y, LEAKY_RELU_SLOPE, out=y, where=y < 0)


def _gelu_numpy_(y: np.ndarray) -> None:
    y *= 0.5 * (1.0 + special.erf(y * SQRT_HALF))


def _gelu_tanh_numpy_(y: np.ndarray) -> None:
    y *= 0.5 * (1.0 + np.tanh(SQRT_2_OVER_PI * (y + GELU_TANH_CUBIC * y**3)))


def _silu_numpy_(y: np.ndarray) -> None:
    y *= special.expit(y)


def _sigmoid_numpy_(y: np.ndarray) -> None:
    special.expit(y, out=y)


def _tanh_numpy_(y: np.ndarray) -> None:
    np.tanh(y, out=y)


def _relu_backward(grad: Any, z_or_y: Any) -> Any:
    # y > 0 exactly where z > 0, so the output serves as well as the input
    return _aten().threshold_backward(grad, z_or_y, 0)


TABLE: dict[str | None, Activation] = {
    None: Activation(lambda y: None, lambda z: z, lambda z: z, lambda grad, z: grad, lambda grad, y: grad),
    "relu": Activation(_relu_numpy_, lambda z: _functional().relu(z), lambda z: z.relu_(), _relu_backward, _relu_backward),
    "leaky_relu": Activation(
        _leaky_relu_numpy_,
        lambda z: _functional().leaky_relu(z, LEAKY_RELU_SLOPE),
        lambda z: _functional().leaky_relu_(z, LEAKY_RELU_SLOPE),
        lambda grad, z: _aten().leaky_relu_backward(grad, z, LEAKY_RELU_SLOPE, False),
        lambda grad, y: _aten().leaky_relu_backward(grad, y, LEAKY_RELU_SLOPE, True),
    ),
    "gelu": Activation(_gelu_numpy_, lambda z: _functional().gelu(z), lambda z: _aten().gelu_(z), lambda grad, z: _aten().gelu_backward(grad, z)),
    "gelu_tanh": Activation(
        _gelu_tanh_numpy_,
        lambda z: _functional().gelu(z, approximate="tanh"),
        lambda z: _aten().gelu_(z, approximate="tanh"),
        lambda grad, z: _aten().gelu_backward(grad, z, approximate="tanh"),
    ),
    "silu": Activation(
        _silu_numpy_, lambda z: _functional().silu(z), lambda z: _functional().silu(z, inplace=True), lambda grad, z: _aten().silu_backward(grad, z)
    ),
    "sigmoid": Activation(
        _sigmoid_numpy_,
        lambda z: z.sigmoid(),
        lambda z: z.sigmoid_(),
        lambda grad, z: _aten().sigmoid_backward(grad, z.sigmoid()),
        lambda grad, y: _aten().sigmoid_backward(grad, y),
    ),
    "tanh": Activation(
        _tanh_numpy_,
        lambda z: z.tanh(),
        lambda z: z.tanh_(),
        lambda grad, z: _aten().tanh_backward(grad, z.tanh()),
        lambda grad, y: _aten().tanh_backward(grad, y),
    ),
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
