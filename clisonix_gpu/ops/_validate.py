"""Input checks shared by the ops: dtypes and shapes, raised before any kernel runs."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..errors import ShapeError

FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPE_NAMES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
REAL_DTYPE_NAMES = ("bool",) + INTEGER_DTYPE_NAMES + FLOAT_DTYPE_NAMES


def dtype_name(a: Any) -> str:
    """``"float32"``, ``"bfloat16"``, ``"int64"``... for NumPy, torch and CuPy arrays alike."""
    return _name_of_dtype(a.dtype)


@functools.lru_cache(maxsize=256)
def _name_of_dtype(dtype: Any) -> str:
    # NumPy builds a dtype's name anew on every str() (microseconds, per argument of every call)
    return str(dtype).removeprefix("torch.")


def require_float(name: str, a: Any) -> None:
    """``TypeError`` unless ``a`` holds real floating-point numbers."""
    if dtype_name(a) not in FLOAT_DTYPE_NAMES:
        raise TypeError(f"{name} has dtype {dtype_name(a)}; expected one of {FLOAT_DTYPE_NAMES}")


def require_real(name: str, a: Any) -> None:
    """``TypeError`` unless ``a`` holds bool, integer or real floating-point values (not complex,
    str, object, datetime or float8)."""
    if dtype_name(a) not in REAL_DTYPE_NAMES:
        raise TypeError(f"{name} has dtype {dtype_name(a)}; expected bool, an integer or a float dtype")


def require_ndim(name: str, a: Any, low: int) -> None:
    """``ShapeError`` unless ``a`` has at least ``low`` dimensions."""
    if a.ndim < low:
        raise ShapeError(f"{name} must have at least {low} dimension{'s' * (low > 1)}; got shape {tuple(a.shape)}")


def require_number(name: str, value: Any) -> float:
    """``value`` as a float; ``TypeError`` unless it is a real number (bools and strings are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def require_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int; ``TypeError`` if it is not an integer, ``ValueError`` naming the allowed
    range if it lies outside [low, high] (either bound may be open)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} = {value} is out of range: expected {allowed}")
    return int(value)


def mantissa_bits(a: Any) -> int:
    """Significant bits of ``a``'s floating dtype (bfloat16 8, float16 11, float32 24, float64 53)."""
    name = dtype_name(a)
    return 8 if name == "bfloat16" else int(np.finfo(name).nmant) + 1
