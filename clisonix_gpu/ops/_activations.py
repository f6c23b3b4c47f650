"""Activation functions for the NumPy path, applied in place in the output's precision."""

from __future__ import annotations

import numpy as np
from scipy import special

ACTIVATIONS = (None, "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
LEAKY_RELU_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default
_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


def check_activation(activation: object) -> None:
    """``ValueError`` listing the valid names unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def apply_activation_(y: np.ndarray, activation: str | None) -> np.ndarray:
    """Apply ``activation`` to ``y`` in place and return it (NaN propagates as in torch)."""
    if activation == "relu":
        y[y < 0] = 0
    elif activation == "leaky_relu":
        np.multiply(y, LEAKY_RELU_SLOPE, out=y, where=y < 0)
    elif activation == "gelu":
        y *= 0.5 * (1.0 + special.erf(y * _SQRT_HALF))
    elif activation == "gelu_tanh":
        y *= 0.5 * (1.0 + np.tanh(_SQRT_2_OVER_PI * (y + 0.044715 * y**3)))
    elif activation == "silu":
        y *= special.expit(y)
    elif activation == "sigmoid":
        special.expit(y, out=y)
    elif activation == "tanh":
        np.tanh(y, out=y)
    return y
