"""The references and peers every test and benchmark compares against, defined once.

``reference_*`` functions are independent float64 implementations used to check correctness.
``*_PEERS`` map a peer's name to a callable that does the same job the way a user would without
this package; benchmarks time them against our op in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .ops.utils import cdiv


def _torch_activation(name: str | None) -> Callable[[Any], Any]:
    from .ops.activations import TABLE

    return TABLE[name].torch


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
    result: np.ndarray = _torch_activation(activation)(torch.from_numpy(pre)).numpy()
    return result


def transform_matrix_error_bound(x: Any, w: Any, bias: Any = None) -> np.ndarray:
    """``|x| @ |w|.T + |bias|`` in float64: the scale that GEMM rounding errors are measured against."""
    import torch

    def abs64(a: Any) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().double().numpy()
        return np.abs(np.asarray(a, dtype=np.float64))

    scale: np.ndarray = abs64(x) @ np.swapaxes(abs64(w), -1, -2)
    return scale if bias is None else scale + abs64(bias)


def _numpy_linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, activation: str | None) -> np.ndarray:
    from .ops.activations import apply_activation_

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

        def linear(a: Any, b: Any, c: Any) -> Any:
            return _torch_linear(a, b, c, activation)

        _compiled[activation] = torch.compile(linear)
    return _compiled[activation](x, w, bias)


# Peers by array kind: what a user of that array library would write instead of our op.
TRANSFORM_MATRIX_PEERS: dict[str, dict[str, Callable[..., Any]]] = {
    "numpy": {"numpy matmul + epilogue": _numpy_linear},
    "torch-cpu": {"torch eager": _torch_linear},
    "torch-cuda": {"torch eager": _torch_linear, "torch.compile": _torch_compile_linear},
}


# ----------------------------------------------------------------------------- binary algebra
# Factories: ``factory(a, b, n)`` prepares what a user of that library would hold already (an
# index, +-1 float matrices) outside the timed region and returns the zero-argument call to time.


def _numpy_popcount_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = cdiv(a.shape[1], 8) * 8
    aw = np.zeros((a.shape[0], width), np.uint8)
    bw = np.zeros((b.shape[0], width), np.uint8)
    aw[:, : a.shape[1]], bw[:, : b.shape[1]] = a, b
    aw, bw = aw.view(np.uint64), bw.view(np.uint64)
    step = max(1, (1 << 24) // max(b.shape[0] * aw.shape[1], 1))
    return np.concatenate([np.bitwise_count(aw[s : s + step, None, :] ^ bw[None]).sum(-1, dtype=np.int32) for s in range(0, len(aw), step)])


def _torch_lut_distances(a: Any, b: Any) -> Any:
    import torch

    lut = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=a.device)
    step = max(1, (1 << 26) // max(b.shape[0] * b.shape[1], 1))
    return torch.cat([lut[(a[s : s + step, None, :] ^ b[None]).long()].sum(-1) for s in range(0, a.shape[0], step)])


def _plus_minus_one(bits: Any, n: int, like_dtype: Any) -> Any:
    import torch

    unpacked = np.unpackbits(bits.cpu().numpy() if isinstance(bits, torch.Tensor) else bits, axis=-1, count=n, bitorder="little")
    signs = unpacked.astype(np.float32) * 2 - 1
    return torch.from_numpy(signs).to(bits.device, like_dtype) if isinstance(bits, torch.Tensor) else signs


def _gemm_on_pm1(a: Any, b: Any, n: int, dtype_name: str) -> Callable[[], Any]:
    import torch

    dtype = getattr(torch, dtype_name) if isinstance(a, torch.Tensor) else np.float32
    fa, fb = _plus_minus_one(a, n, dtype), _plus_minus_one(b, n, dtype)
    return lambda: fa @ fb.T


BINARY_MATMUL_PEERS: dict[str, dict[str, Callable[..., Callable[[], Any]]]] = {
    "numpy": {
        "numpy xor + bitwise_count": lambda a, b, n: lambda: n - 2 * _numpy_popcount_distances(a, b),
        "numpy fp32 GEMM on +-1": lambda a, b, n: _gemm_on_pm1(a, b, n, "float32"),
    },
    # (the xor + byte-LUT composition is 30-90x slower than the GEMM on CPU: not worth timing there)
    "torch-cpu": {"torch fp32 GEMM on +-1": lambda a, b, n: _gemm_on_pm1(a, b, n, "float32")},
    "torch-cuda": {
        "torch xor + byte LUT": lambda a, b, n: lambda: n - 2 * _torch_lut_distances(a, b),
        "torch fp16 GEMM on +-1": lambda a, b, n: _gemm_on_pm1(a, b, n, "float16"),
    },
}


def _faiss_topk(q: np.ndarray, db: np.ndarray, k: int) -> Callable[[], Any]:
    import faiss

    index = faiss.IndexBinaryFlat(8 * db.shape[1])
    index.add(np.ascontiguousarray(db))
    return lambda: index.search(np.ascontiguousarray(q), k)


def _numpy_topk(q: np.ndarray, db: np.ndarray, k: int) -> Callable[[], Any]:
    def run() -> Any:
        d = _numpy_popcount_distances(q, db)
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        return np.take_along_axis(d, idx, axis=1), idx

    return run


def _torch_gemm_topk(q: Any, db: Any, k: int) -> Callable[[], Any]:
    import torch

    bits = 8 * db.shape[1]
    dtype = torch.float16 if q.is_cuda else torch.float32
    fq, fdb = _plus_minus_one(q, bits, dtype), _plus_minus_one(db, bits, dtype)

    def run() -> Any:
        d = (bits - fq @ fdb.T) * 0.5  # exact: integers below 2048 in fp16
        return torch.topk(d, k, dim=1, largest=False)

    return run


def _faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


HAMMING_TOPK_PEERS: dict[str, dict[str, Callable[..., Callable[[], Any]]]] = {
    "numpy": {
        **({"faiss IndexBinaryFlat": _faiss_topk} if _faiss_available() else {}),
        "numpy bitwise_count + argpartition": _numpy_topk,
    },
    "torch-cuda": {"torch fp16 GEMM on +-1 + topk": _torch_gemm_topk},
}


def _numpy_radius(q: np.ndarray, db: np.ndarray, r: int) -> Callable[[], Any]:
    """CSR ``(offsets, indices, distances)`` from blocks of ``_numpy_popcount_distances`` and ``nonzero``."""

    def run() -> Any:
        step = max(1, (1 << 20) // max(q.shape[0], 1))
        rows, cols, dist = [], [], []
        for s in range(0, db.shape[0], step):
            d = _numpy_popcount_distances(q, db[s : s + step])
            i, j = np.nonzero(d <= r)
            rows.append(i)
            cols.append(j + s)
            dist.append(d[i, j])
        i, j, d = np.concatenate(rows), np.concatenate(cols), np.concatenate(dist)
        order = np.lexsort((j, i))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(i, minlength=q.shape[0]))])
        return offsets, j[order], d[order]

    return run


HAMMING_RADIUS_PEERS: dict[str, dict[str, Callable[..., Callable[[], Any]]]] = {
    "numpy": {"numpy bitwise_count + nonzero": _numpy_radius},
}


# ----------------------------------------------------------------------------- svd_compress
# Factories: ``factory(a, k, oversample, power_iters)`` returns the zero-argument call to time;
# the call returns the rank-k reconstruction, so every peer's error is measured the same way.


def _sklearn_randomized_svd(a: np.ndarray, k: int, oversample: int, power_iters: int) -> Callable[[], Any]:
    from sklearn.utils.extmath import randomized_svd

    def run() -> Any:
        mats = a.reshape((-1,) + a.shape[-2:])
        out = []
        for m in mats:
            u, s, vt = randomized_svd(m, k, n_oversamples=oversample, n_iter=power_iters, random_state=0)
            out.append((u * s) @ vt)
        return np.stack(out).reshape(a.shape)

    return run


def _torch_svd_lowrank(a: Any, k: int, oversample: int, power_iters: int) -> Callable[[], Any]:
    import torch

    def run() -> Any:
        u, s, v = torch.svd_lowrank(a, q=k + oversample, niter=power_iters)
        return (u[..., :k] * s[..., None, :k]) @ v[..., :k].transpose(-1, -2)

    return run


def _exact_svd(a: Any, k: int, oversample: int, power_iters: int) -> Callable[[], Any]:
    if isinstance(a, np.ndarray):

        def run_np() -> Any:
            u, s, vh = np.linalg.svd(a, full_matrices=False)
            return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]

        return run_np
    import torch

    def run_torch() -> Any:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]

    return run_torch


SVD_COMPRESS_PEERS: dict[str, dict[str, Callable[..., Callable[[], Any]]]] = {
    "numpy": {"sklearn randomized_svd": _sklearn_randomized_svd, "numpy.linalg.svd (exact)": _exact_svd},
    "torch-cpu": {"torch.svd_lowrank": _torch_svd_lowrank, "torch.linalg.svd (exact)": _exact_svd},
    "torch-cuda": {"torch.svd_lowrank": _torch_svd_lowrank, "torch.linalg.svd (exact)": _exact_svd},
}
