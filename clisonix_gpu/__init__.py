"""clisonix-gpu: GPU compute kernels for people who build and serve models.

Fused tensor transforms, low-rank compression and 1-bit algebra as ops on NumPy arrays,
torch tensors (CPU and CUDA) and CuPy arrays; results come back in the input's array type.

>>> import numpy as np, clisonix_gpu as cg
>>> cg.transform_matrix(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from types import ModuleType

from . import alda, ops
from ._dispatch import BackendStatus, backends, current_backend, use_backend
from .algebra import BinaryAlgebra
from .errors import BackendUnavailable, ShapeError
from .ops import *  # noqa: F403 - the LIAM ops are the package's top-level API

__version__ = "0.1.0"

__all__ = [
    *ops.__all__,
    "BackendStatus",
    "BackendUnavailable",
    "BinaryAlgebra",
    "ShapeError",
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
