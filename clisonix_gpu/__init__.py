"""clisonix-gpu: GPU compute kernels for people who build and serve models.

Fused tensor transforms, low-rank compression and 1-bit algebra as ops on NumPy arrays,
torch tensors (CPU and CUDA) and CuPy arrays; results come back in the input's array type.

>>> import numpy as np, clisonix_gpu as cg
>>> cg.transform_matrix(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

import sys
from types import ModuleType

from . import alda, ops
from ._dispatch import BackendStatus, backends, current_backend, use_backend
from .errors import BackendUnavailable, ShapeError
from .ops.activations import ACTIVATIONS
from .ops.binary import (
    RadiusResult,
    binarize,
    binary_matmul,
    hamming_distance,
    hamming_radius,
    hamming_topk,
    pack_bits,
    unpack_bits,
)
from .ops.svd_compress import LowRank, svd_compress
from .ops.transform_matrix import release_packed_weights, transform_matrix, transform_matrix_cpu_method
from .opset import BinaryAlgebra, OpSet

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BackendStatus",
    "BackendUnavailable",
    "BinaryAlgebra",
    "LowRank",
    "OpSet",
    "RadiusResult",
    "ShapeError",
    "binarize",
    "binary_matmul",
    "hamming_distance",
    "hamming_radius",
    "hamming_topk",
    "ops",
    "pack_bits",
    "svd_compress",
    "transform_matrix",
    "transform_matrix_cpu_method",
    "release_packed_weights",
    "unpack_bits",
    "__version__",
    "alda",
    "backends",
    "current_backend",
    "use_backend",
]


def __getattr__(name: str) -> ModuleType:
    # clisonix_gpu.nn and clisonix_gpu.torch import torch: load them on first use only
    if name in ("nn", "torch"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# torch users get torch.ops.clisonix.* as soon as they import the package; NumPy-only users never
# import torch (imported later, torch registers the ops on `import clisonix_gpu.torch`, which
# clisonix_gpu.nn and the first differentiable or traced transform_matrix call do)
if "torch" in sys.modules:
    from . import torch as _torch_ops  # noqa: F401
