"""Activation epilogues for GEMM kernels, chosen by a ``tl.constexpr`` name.

Every function computes in the accumulator's precision (fp32, or fp64 for fp64 inputs) and
propagates NaN the way torch does. ``tanh`` is built from ``exp`` because libdevice calls do
not run under the Triton interpreter; for small |x| a Taylor series avoids the cancellation
in ``1 - exp(-2|x|)``.
"""

import triton
import triton.language as tl

from . import activation_table as table

# Triton kernels read module-level constants only as constexprs (tensor * constexpr: the
# interpreter cannot take a constexpr on the left).
LEAKY_RELU_SLOPE = tl.constexpr(table.LEAKY_RELU_SLOPE)
SQRT_HALF = tl.constexpr(table.SQRT_HALF)
SQRT_2_OVER_PI = tl.constexpr(table.SQRT_2_OVER_PI)
GELU_TANH_CUBIC = tl.constexpr(table.GELU_TANH_CUBIC)


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = tl.minimum(x * x, 0.015625)  # the series is only used for |x| < 0.125; keeps it finite
    poly = -929569.0 / 638512875.0
    poly = poly * x2 + 21844.0 / 6081075.0
    poly = poly * x2 - 1382.0 / 155925.0
    poly = poly * x2 + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    small = x + x * x2 * poly
    return tl.where(ax < 0.125, small, tl.where(x < 0, -big, big))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """``ACTIVATION``: ``""`` (identity) or a name of ``activation_table.ACTIVATIONS``."""
    if ACTIVATION == "relu":
        x = tl.where(x < 0, 0.0, x)
    elif ACTIVATION == "leaky_relu":
        x = tl.where(x < 0, x * LEAKY_RELU_SLOPE, x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * SQRT_HALF))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh((x + x * GELU_TANH_CUBIC * x * x) * SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        x = x * _sigmoid(x)
    elif ACTIVATION == "sigmoid":
        x = _sigmoid(x)
    elif ACTIVATION == "tanh":
        x = _tanh(x)
    return x
