"""LIAM ops: one module of host code per op family (validate, pick a backend, call its kernel)."""

from .binary import (
    RadiusResult,
    binarize,
    binary_matmul,
    hamming_distance,
    hamming_radius,
    hamming_topk,
    pack_bits,
    unpack_bits,
)
from .svd_compress import LowRank, svd_compress
from .transform_matrix import ACTIVATIONS, transform_matrix

__all__ = [
    "ACTIVATIONS",
    "LowRank",
    "RadiusResult",
    "binarize",
    "binary_matmul",
    "hamming_distance",
    "hamming_radius",
    "hamming_topk",
    "pack_bits",
    "svd_compress",
    "transform_matrix",
    "unpack_bits",
]
