"""The references and peers every test and benchmark compares against, defined once.

``reference_*`` functions are independent float64 implementations used to check correctness.
``*_PEERS`` map a peer's name to a callable that does the same job the way a user would without
this package; benchmarks time them against our op in the same run.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _torch_activation(name: str | None) -> Callable[[Any], Any]:
    import torch
    import torch.nn.functional as F

    return {
        None: lambda t: t,
        "relu": F.relu,
        "leaky_relu": F.leaky_relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
    }[name]


def reference_transform_matrix(x: Any, w: Any, bias: Any = None, activation: str | None = None) -> np.ndarray:
    """``activation(x @ w.T + bias)`` in float64 (NumPy GEMM, torch's float64 activations)."""
    import torch

    def f64(a: Any) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            return a.detach().cpu().double().numpy()
        return np.asarray(a, dtype=np.float64)

    pre = f64(x) @ np.swapaxes(f64(w), -1, -2)
    if bias is not None:
        pre = pre + f64(bias)
    return _torch_activation(activation)(torch.from_numpy(pre)).numpy()


def transform_matrix_error_bound(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """``|x| @ |w|.T + |bias|`` in float64: the scale that GEMM rounding errors are measured against."""
    import torch

    def abs64(a: Any) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().double().numpy()
        return np.abs(np.asarray(a, dtype=np.float64))

    scale = abs64(x) @ np.swapaxes(abs64(w), -1, -2)
    return scale if bias is None else scale + abs64(bias)


def _numpy_linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, activation: str | None) -> np.ndarray:
    from .ops._activations import apply_activation_

    y = x @ w.T
    if bias is not None:
        y += bias
    return apply_activation_(y, activation)


def _torch_linear(x: Any, w: Any, bias: Any, activation: str | None) -> Any:
    import torch.nn.functional as F

    return _torch_activation(activation)(F.linear(x, w, bias))


_compiled: dict[str | None, Callable[..., Any]] = {}


def _torch_compile_linear(x: Any, w: Any, bias: Any, activation: str | None) -> Any:
    import torch

    if activation not in _compiled:
        _compiled[activation] = torch.compile(lambda a, b, c: _torch_linear(a, b, c, activation))
    return _compiled[activation](x, w, bias)


# Peers by array kind: what a user of that array library would write instead of our op.
TRANSFORM_MATRIX_PEERS: dict[str, dict[str, Callable[..., Any]]] = {
    "numpy": {"numpy matmul + epilogue": _numpy_linear},
    "torch-cpu": {"torch eager": _torch_linear},
    "torch-cuda": {"torch eager": _torch_linear, "torch.compile": _torch_compile_linear},
}
