"""Input checks shared by the ops: dtypes and shapes, raised before any kernel runs."""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(a: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ``"int64"``... for NumPy, torch and CuPy arrays alike."""
    return str(a.dtype).removeprefix("torch.")


def require_float(name: str, a: Any) -> None:
    """``TypeError`` unless ``a`` holds real floating-point numbers."""
    if dtype_name(a) not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"{name} has dtype {dtype_name(a)}; expected one of {FLOAT_DTYPE_NAMES}")


def mantissa_bits(a: Any) -> int:
    """Significant bits of ``a``'s floating dtype (bfloat16 8, float16 11, float32 24, float64 53)."""
    name = dtype_name(a)
    return 8 if name == "bfloat16" else int(np.finfo(name).nmant) + 1
