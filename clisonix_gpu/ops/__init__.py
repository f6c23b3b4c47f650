"""LIAM ops: one module of host code per op family (validate, pick a backend, call its kernel)."""

from .binary import *  # noqa: F403 - every binary-algebra name is public
from .binary import __all__ as _binary_names
from .svd_compress import LowRank, svd_compress
from .transform_matrix import ACTIVATIONS, transform_matrix

__all__ = ["ACTIVATIONS", "LowRank", *_binary_names, "svd_compress", "transform_matrix"]
