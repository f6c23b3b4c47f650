"""clisonix-gpu: GPU compute kernels for people who build and serve models.

Fused tensor transforms, low-rank compression and 1-bit algebra as ops on NumPy arrays,
torch tensors (CPU and CUDA) and CuPy arrays; results come back in the input's array type.

>>> import numpy as np, clisonix_gpu as cg
>>> cg.transform_matrix(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from . import alda
from ._dispatch import BackendStatus, backends, current_backend, use_backend
from .algebra import BinaryAlgebra
from .errors import BackendUnavailable, ShapeError
from .ops import (
    ACTIVATIONS,
    LowRank,
    RadiusResult,
    binarize,
    binary_matmul,
    hamming_distance,
    hamming_radius,
    hamming_topk,
    pack_bits,
    svd_compress,
    transform_matrix,
    unpack_bits,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BackendStatus",
    "BackendUnavailable",
    "BinaryAlgebra",
    "LowRank",
    "RadiusResult",
    "ShapeError",
    "__version__",
    "alda",
    "nn",
    "backends",
    "binarize",
    "binary_matmul",
    "current_backend",
    "hamming_distance",
    "hamming_radius",
    "hamming_topk",
    "pack_bits",
    "svd_compress",
    "transform_matrix",
    "unpack_bits",
    "use_backend",
]


def __getattr__(name: str):
    # clisonix_gpu.nn and clisonix_gpu.torch import torch: load them on first use only
    if name in ("nn", "torch"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
