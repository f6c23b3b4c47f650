"""``svd_compress``: randomized truncated SVD (Halko-Martinsson-Tropp) of a matrix or a batch.

Range finder with a Rademacher sketch from a counter-based generator (identical bits on every
backend for one seed), ``power_iters`` power iterations re-orthonormalised by QR, then the SVD of
the small projected matrix. ``tol=`` grows the sketch in blocks until the exact a-posteriori error
``sqrt(|A|^2 - sum_j<=r s_j^2) / |A|`` of the truncation reaches ``tol``, per matrix.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from .. import _dispatch
from ..errors import ShapeError
from ._validate import dtype_name, require_float, require_int, require_number
from .utils import cdiv, interpreter_enabled, launch

__all__ = ["LowRank", "svd_compress", "rademacher_sketch"]

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def seed_mix(seed: int) -> int:
    """The 64-bit offset that a seed adds to every counter of the sketch generator."""
    return (int(seed) * _GOLDEN) & _MASK64


def rademacher_sketch(rows: int, cols: int, seed: int, col_start: int = 0) -> np.ndarray:
    """Sketch matrix (rows, cols) of +-1.0: entry (i, j) from splitmix64 of counter
    ``(col_start + j) << 32 | i``; the Triton kernel computes the same bits."""
    i = np.arange(rows, dtype=np.uint64)[:, None]
    j = np.arange(col_start, col_start + cols, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = np.uint64(seed_mix(seed)) + ((j << np.uint64(32)) | i)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    signs: np.ndarray = 1.0 - 2.0 * (z >> np.uint64(63)).astype(np.float64)
    return signs


class LowRank:
    """A low-rank factorisation ``a ≈ u @ diag(s) @ vh`` (batched over leading dimensions).

    ``u`` (..., M, k), ``s`` (..., k) descending, ``vh`` (..., k, N), in the input's array type and
    device. In ``tol=`` mode ranks differ per matrix: ``ranks`` holds them, and factors are padded
    with zero singular values up to ``rank`` (the largest).

    Example:

    >>> a = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 4.0))  # rank 1, (4, 3)
    >>> lr = cg.svd_compress(a, k=1)
    >>> lr.u.shape, lr.s.shape, lr.vh.shape, lr.rank
    ((4, 1), (1,), (1, 3), 1)
    >>> bool(np.allclose(lr.reconstruct(), a)), bool(np.allclose(lr.matmul(np.eye(3)), a))
    (True, True)
    >>> float(lr.error_estimate) < 1e-6, np.asarray(lr).shape
    (True, (4, 3))
    """

    def __init__(self, u: Any, s: Any, vh: Any, ranks: np.ndarray, error_estimate: np.ndarray, source_nbytes: int):
        self.u, self.s, self.vh = u, s, vh
        self.ranks = ranks
        self._error = error_estimate
        self._source_nbytes = source_nbytes

    @property
    def rank(self) -> int:
        """Number of factor columns stored (the largest per-matrix rank)."""
        return int(self.s.shape[-1])

    @property
    def error_estimate(self) -> Any:
        """A-posteriori relative Frobenius error ``|a - u s vh|_F / |a|_F`` (float, or an array per
        matrix for batches), from ``|a|^2 - sum s_j^2``: exact up to rounding, which limits it to
        about 1e-3 for float32 input and 1e-7 for float64."""
        return float(self._error) if self._error.ndim == 0 else self._error

    @property
    def nbytes(self) -> int:
        return int(sum(_nbytes(t) for t in (self.u, self.s, self.vh)))

    @property
    def compression_ratio(self) -> float:
        """Bytes of the dense input over bytes of the factors."""
        return self._source_nbytes / max(self.nbytes, 1)

    def reconstruct(self) -> Any:
        """The dense ``u @ diag(s) @ vh`` (..., M, N)."""
        return (self.u * self.s[..., None, :]) @ self.vh

    def matmul(self, y: Any) -> Any:
        """``reconstruct() @ y`` without forming the dense matrix: ``u @ (s * (vh @ y))``.

        ``y``: a vector (N,), giving (..., M), or matrices (..., N, P) whose leading dimensions
        broadcast against the factors', giving (..., M, P); the factors' array type and device,
        a floating dtype (for torch, the factors' dtype). Raises ``TypeError`` (array type, device
        or dtype) and ``ShapeError`` (shapes named) before any product runs.
        """
        _dispatch.common_kind(("factors", "y"), (self.vh, y))
        require_float("y", y)
        n = self.vh.shape[-1]
        if y.ndim == 0 or y.shape[-1 if y.ndim == 1 else -2] != n:
            raise ShapeError(f"y {tuple(y.shape)} must be (N,) or (..., N, P) with N = {n} for factors of shape {self.shape}")
        lead, y_lead = tuple(self.vh.shape[:-2]), tuple(y.shape[:-2])
        try:
            np.broadcast_shapes(lead, y_lead)
        except ValueError:
            raise ShapeError(f"y {tuple(y.shape)}: leading dimensions {y_lead} do not broadcast against the factors' {lead}") from None
        if type(y).__module__.startswith("torch") and y.dtype != self.vh.dtype:
            raise TypeError(f"y has dtype {dtype_name(y)}; torch needs the factors' dtype {dtype_name(self.vh)}")
        if y.ndim == 1:
            return (self.u @ (self.s * (self.vh @ y))[..., None])[..., 0]
        return self.u @ (self.s[..., :, None] * (self.vh @ y))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the matrix (or batch) this factorisation stands for: (..., M, N)."""
        return tuple(self.u.shape[:-1]) + (int(self.vh.shape[-1]),)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(_host(self.reconstruct()), dtype=dtype)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.reconstruct().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self.reconstruct().__dlpack_device__()

    def __repr__(self) -> str:
        return f"LowRank(shape={self.shape}, rank={self.rank}, compression_ratio={self.compression_ratio:.2f})"


def _nbytes(t: Any) -> int:
    return int(t.nbytes) if hasattr(t, "nbytes") else int(t.numel() * t.element_size())


def svd_compress(a: Any, k: int | None = None, *, tol: float | None = None, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> LowRank:
    """Randomized truncated SVD of ``a`` (M, N) or (..., M, N): a :class:`LowRank`.

    Exactly one of ``k`` (1 <= k <= min(M, N)) or ``tol`` (0 < tol < 1, relative Frobenius error;
    rank chosen per matrix, at most min(M, N)). Sketch size ``k + oversample``; ``seed`` fixes the
    sketch, so one seed gives the same factors on every backend to float tolerance and bit-identical
    factors on one backend. Signs: the largest-|.| entry of each column of ``u`` is positive.
    float16/bfloat16 are computed in float32. Raises ``ShapeError`` (fewer than 2 dimensions),
    ``TypeError`` (``a`` not an array, integer/complex dtype; k, tol, oversample, power_iters or
    seed of the wrong type), ``ValueError`` (k/tol out of range, both or neither
    given, NaN/Inf in ``a``).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 80))  # rank 5
    >>> lr = cg.svd_compress(a, k=5)
    >>> lr.u.shape, lr.s.shape, lr.vh.shape
    ((100, 5), (5,), (5, 80))
    >>> bool(np.allclose(lr.reconstruct(), a))
    True
    >>> cg.svd_compress(a, tol=1e-6).rank  # the smallest rank that reaches tol
    5
    >>> cg.svd_compress(rng.standard_normal((3, 8, 6)), k=2).s.shape  # a batch of three matrices
    (3, 2)
    """
    _dispatch.array_kind(a, "a")
    require_float("a", a)
    if a.ndim < 2:
        raise ShapeError(f"a must be a matrix (M, N) or a batch (..., M, N); got shape {tuple(a.shape)}")
    m, n = a.shape[-2], a.shape[-1]
    limit = min(m, n)
    if (k is None) == (tol is None):
        raise ValueError(f"give exactly one of k (1 <= k <= {limit}) or tol (0 < tol < 1); got k={k}, tol={tol}")
    if k is not None:
        k = require_int("k", k)
        if not 1 <= k <= limit:
            raise ValueError(f"k = {k} is out of range for a {m}x{n} matrix: expected 1 <= k <= {limit}")
    else:
        if not 0 < require_number("tol", tol) < 1:
            raise ValueError(f"tol = {tol!r} is out of range: expected 0 < tol < 1")
        if limit == 0:
            raise ValueError(f"tol mode needs a non-empty matrix; got {m}x{n}")
    oversample = require_int("oversample", oversample, 0)
    power_iters = require_int("power_iters", power_iters, 0)
    seed = require_int("seed", seed, 0)
    u, s, vh, ranks, err = _dispatch.call(
        "svd_compress", ("a",), (a,), k=k, tol=None if tol is None else float(tol),
        oversample=oversample, power_iters=power_iters, seed=seed,
    )  # fmt: skip
    u, s, vh = (_dispatch.cast_like(t, a) for t in (u, s, vh))
    itemsize = np.dtype("float32").itemsize if dtype_name(a) == "bfloat16" else np.dtype(dtype_name(a)).itemsize
    source = math.prod(a.shape) * (2 if dtype_name(a) in ("bfloat16", "float16") else itemsize)
    return LowRank(u, s, vh, np.asarray(_host(ranks)), np.asarray(_host(err), dtype=np.float64), source)


def _host(t: Any) -> Any:
    if type(t).__module__.startswith("torch"):
        return t.detach().cpu().numpy()
    if type(t).__module__.startswith("cupy"):
        return t.get()
    return t


# ----------------------------------------------------------------------------- shared algorithm
# One implementation over a small set of array operations (NumPy, or torch for the Triton path)
# so the paths cannot drift apart; they differ only in the first sketch GEMM, fused on GPU.
# Rank choice and error estimates use the (B, cols) singular values on the host, in float64.

_Factors = tuple[Any, Any, Any, Any, Any]  # u, s, vh, ranks, error estimates


class _NumpyOps:
    @staticmethod
    def qr(y: np.ndarray) -> np.ndarray:
        return np.linalg.qr(y)[0]

    @staticmethod
    def qr_factors(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, r = np.linalg.qr(y)
        return q, r

    @staticmethod
    def svd(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.linalg.svd(b, full_matrices=False)

    @staticmethod
    def t(x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def host(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def like(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return values.astype(ref.dtype)

    @staticmethod
    def signs(u: np.ndarray) -> np.ndarray:
        idx = np.argmax(np.abs(u), axis=-2)
        pivot = np.take_along_axis(u, idx[..., None, :], axis=-2)[..., 0, :]
        return np.where(pivot < 0, -1.0, 1.0).astype(u.dtype)

    @staticmethod
    def squared_norms(a: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, np.einsum("bij,bij->bi", a, a).sum(axis=-1, dtype=np.float64))

    @staticmethod
    def squared_norms_wide(a: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, np.einsum("bij,bij->b", a, a, dtype=np.float64))

    @staticmethod
    def all_finite(a: np.ndarray) -> bool:
        return bool(np.isfinite(a).all())

    @staticmethod
    def sketch_matmul(a: np.ndarray, cols: int, seed: int) -> np.ndarray:
        product: np.ndarray = a @ rademacher_sketch(a.shape[-1], cols, seed).astype(a.dtype)
        return product


def _small_svd(b: Any, ops: Any) -> tuple[Any, Any, Any]:
    """SVD of the projected matrices ``b`` (B, r, N). When r < N it goes through ``b^T = q R``
    and the SVD of the small (r, r) factor: ``R^T = w diag(s) z^T``, so ``b = w diag(s) (q z)^T``.
    Measured 1.3-3x faster than LAPACK's own SVD of the wide matrix in NumPy and torch on CPU,
    and on CUDA the (r, r) size is what cuSOLVER solves as one batch (up to 32), while the QR of
    small matrices is the batched Triton kernel."""
    if b.shape[-2] >= b.shape[-1]:
        return ops.svd(b)  # type: ignore[no-any-return]
    q, r = ops.qr_factors(ops.t(b))
    w, s, zh = ops.svd(ops.t(r))
    return w, s, zh @ ops.t(q)


def _checked_squared_norms(a: Any, ops: Any) -> np.ndarray:
    """|a_b|_F^2 per matrix in float64 (B,), which doubles as the NaN/Inf check: one pass over
    ``a`` in its own precision, and a float64 pass only where squares left float32's range."""
    norm2: np.ndarray = ops.squared_norms(a)
    if np.isfinite(norm2).all() and (norm2 > _TINY).all():
        return norm2
    if not ops.all_finite(a):
        raise ValueError("a contains NaN or Inf: a randomized SVD of it would be meaningless")
    wide: np.ndarray = ops.squared_norms_wide(a)  # finite entries whose squares overflow or underflow float32
    return wide


_TINY = 1e-30  # below this a float32 sum of squares may have lost entries to underflow


def _randomized_svd(a: Any, ops: Any, *, k: int | None, tol: float | None, oversample: int, power_iters: int, seed: int) -> _Factors:
    """Factors of ``a`` (B, M, N), float32/float64, with the array operations ``ops``."""
    batch, m, n = a.shape
    limit = min(m, n)
    norm2 = _checked_squared_norms(a, ops)
    cols = min(limit, (k if k is not None else min(limit, 16)) + oversample)
    while True:
        q = ops.qr(ops.sketch_matmul(a, cols, seed))
        for _ in range(power_iters):
            q = ops.qr(a @ ops.qr(ops.t(a) @ q))
        ub, s, vh = _small_svd(ops.t(q) @ a, ops)  # SVD of the projected (B, cols, N) matrix
        s_host = ops.host(s)
        # |A - P_r A|^2 = |A|^2 - sum_{j<=r} s_j^2 exactly, for the projector P_r onto u[:, :r];
        # a zero matrix is reproduced exactly at any rank: error 0
        rel2 = np.clip(1.0 - np.cumsum(s_host**2, axis=-1) / np.where(norm2 > 0, norm2, 1.0)[:, None], 0.0, None)
        rel2[norm2 == 0] = 0.0
        if k is not None:
            ranks = np.full(batch, k)
            break
        assert tol is not None  # k and tol: exactly one is set
        reached = rel2 <= tol * tol
        if cols >= limit or reached.any(axis=-1).all():
            ranks = np.where(reached.any(axis=-1), np.argmax(reached, axis=-1) + 1, cols)
            break
        cols = min(limit, 2 * cols)  # grow the sketch and start over with the same seed
    r = int(ranks.max()) if batch else (k or 1)
    keep = ops.like(np.arange(r)[None, :] < ranks[:, None], s)  # tol mode: zero columns past each rank
    u = (q @ ub[..., :r]) * keep[:, None, :]
    s, vh = s[..., :r] * keep, vh[..., :r, :] * keep[:, :, None]
    sign = ops.signs(u)
    err = np.sqrt(rel2[np.arange(batch), ranks - 1]) if batch else np.zeros(0)
    return u * sign[..., None, :], s, vh * sign[..., :, None], ranks, err


def _compute_dtype(name: str) -> str:
    return "float64" if name == "float64" else "float32"


@_dispatch.register("svd_compress", "numpy", takes_cpu_tensors=True)
def _svd_compress_numpy(a: Any, **params: Any) -> _Factors:
    if not isinstance(a, np.ndarray):  # CPU torch tensor: torch's LAPACK beats a NumPy view here
        return _svd_compress_torch(a.detach(), _TorchCpuOps, **params)
    lead, (m, n) = a.shape[:-2], a.shape[-2:]
    stack = a.reshape((math.prod(lead), m, n)).astype(_compute_dtype(a.dtype.name), copy=False)
    u, s, vh, ranks, err = _randomized_svd(stack, _NumpyOps, **params)
    r = s.shape[-1]
    return (u.reshape(lead + (m, r)), s.reshape(lead + (r,)), vh.reshape(lead + (r, n)),
            ranks.reshape(lead), err.reshape(lead))  # fmt: skip


# ----------------------------------------------------------------------------- Triton backend


class _TorchOps:
    """torch versions of the array operations; the first sketch GEMM and the QR of small matrices
    are Triton kernels."""

    triton_qr = True

    @classmethod
    def qr(cls, y: Any) -> Any:
        return cls.qr_factors(y)[0]

    @classmethod
    def qr_factors(cls, y: Any) -> tuple[Any, Any]:
        import torch

        if cls.triton_qr and _fits_one_program(y):
            return _householder_qr(y)
        q, r = torch.linalg.qr(y)
        return q, r

    @staticmethod
    def svd(b: Any) -> Any:
        import torch

        return torch.linalg.svd(b, full_matrices=False)

    @staticmethod
    def t(x: Any) -> Any:
        return x.transpose(-1, -2)

    @staticmethod
    def host(x: Any) -> np.ndarray:
        return cast(np.ndarray, x.detach().double().cpu().numpy())

    @staticmethod
    def like(values: np.ndarray, ref: Any) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(values)).to(ref.device, ref.dtype)

    @staticmethod
    def signs(u: Any) -> Any:
        import torch

        idx = u.abs().argmax(dim=-2)
        pivot = torch.take_along_dim(u, idx[..., None, :], dim=-2)[..., 0, :]
        return torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)

    @staticmethod
    def squared_norms(a: Any) -> np.ndarray:
        import torch

        rows = torch.linalg.vector_norm(a, dim=-1)  # one pass, no (M, N) temporary
        return cast(np.ndarray, rows.double().square().sum(dim=-1).cpu().numpy())

    @staticmethod
    def squared_norms_wide(a: Any) -> np.ndarray:

        return cast(np.ndarray, a.double().square().sum(dim=(-2, -1)).cpu().numpy())

    @staticmethod
    def all_finite(a: Any) -> bool:
        import torch

        return bool(torch.isfinite(a).all())

    @staticmethod
    def sketch_matmul(a: Any, cols: int, seed: int) -> Any:
        import torch

        from ..kernels.svd_compress import sketch_matmul_kernel

        batch, m, n = a.shape
        a = a if a.stride(-1) == 1 else a.contiguous()
        y = torch.empty((batch, m, cols), dtype=a.dtype, device=a.device)
        block_l = min(64, _tile(cols))
        mix = seed_mix(seed)
        mix = mix - (1 << 64) if mix >= 1 << 63 else mix  # the same 64 bits, as a signed argument

        def grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return (cdiv(m, meta["BLOCK_M"]), cdiv(cols, block_l), batch)

        launch(sketch_matmul_kernel, grid, a, y, m, n, cols, a.stride(0), a.stride(1), y.stride(0), y.stride(1), mix, on=a,
               INTERPRETER_DOT=interpreter_enabled(), ACC_FP64=a.dtype == torch.float64, BLOCK_L=block_l, BLOCK_K=_SKETCH_BLOCK_K)  # fmt: skip
        return y


_SKETCH_BLOCK_K = 32  # the sketch GEMM's reduction step, fixed for reproducible bits
# The (M, L) tile of the QR kernel: in registers without spills up to this (sm_90, Triton 3.9; 32 KiB
# tiles, fp32 128 x 64 and 256 x 32, spill 8-16 bytes even on 16 warps). Larger tiles use torch.linalg.qr.
_QR_TILE_BYTES = 16 << 10


def _tile(size: int) -> int:
    """A kernel block covering ``size``: the next power of two, at least 16."""
    return max(16, 1 << (size - 1).bit_length())


def _fits_one_program(y: Any) -> bool:
    m, cols = y.shape[-2], y.shape[-1]
    return bool(1 <= cols <= m and _tile(m) * _tile(cols) * y.element_size() <= _QR_TILE_BYTES)


def _householder_qr(y: Any) -> tuple[Any, Any]:
    """Reduced QR of ``y`` (B, M, L), M >= L, float32/float64 on the Triton device: ``q`` (B, M, L)
    with orthonormal columns and upper-triangular ``r`` (B, L, L), one Triton program per matrix."""
    import torch

    from ..kernels.svd_compress import householder_qr_kernel

    batch, m, cols = y.shape
    q = torch.empty((batch, m, cols), dtype=y.dtype, device=y.device)
    r = torch.empty((batch, cols, cols), dtype=y.dtype, device=y.device)
    if batch == 0:
        return q, r
    block_m, block_l = _tile(m), _tile(cols)
    launch(householder_qr_kernel, (batch,), y, q, r, m, cols, y.stride(0), y.stride(1), y.stride(2), on=y,
           ACC_FP64=y.dtype == torch.float64, BLOCK_M=block_m, BLOCK_L=block_l,
           num_warps=_qr_warps(block_m, block_l, y.element_size()))  # fmt: skip
    return q, r


def _qr_warps(block_m: int, block_l: int, element_size: int) -> int:
    """Warps of one QR program, so that its tile stays in registers (sm_90, Triton 3.9): 8 for
    float32 tiles above 8 KiB; 4 otherwise (float64 128 x 16 spills 32 bytes on 8 warps, none on 4)."""
    return 8 if element_size == 4 and block_m * block_l * element_size > 8192 else 4


class _TorchCpuOps(_TorchOps):
    """torch on the CPU: the same sketch as the NumPy path, applied by torch's matmul, and
    LAPACK's QR."""

    triton_qr = False

    @staticmethod
    def sketch_matmul(a: Any, cols: int, seed: int) -> Any:
        import torch

        return a @ torch.from_numpy(rademacher_sketch(a.shape[-1], cols, seed)).to(a.dtype)


@_dispatch.register("svd_compress", "triton")
def _svd_compress_triton(a: Any, **params: Any) -> _Factors:
    return _svd_compress_torch(a, _TorchOps, **params)


def _svd_compress_torch(a: Any, ops: Any, **params: Any) -> _Factors:
    import torch

    lead, (m, n) = tuple(a.shape[:-2]), tuple(a.shape[-2:])
    compute = torch.float64 if a.dtype == torch.float64 else torch.float32
    stack = a.reshape((math.prod(lead), m, n)).to(compute)
    u, s, vh, ranks, err = _randomized_svd(stack, ops, **params)
    r = s.shape[-1]
    return (u.reshape(lead + (m, r)), s.reshape(lead + (r,)), vh.reshape(lead + (r, n)),
            torch.from_numpy(ranks.reshape(lead)), torch.from_numpy(err.reshape(lead)))  # fmt: skip
