"""Binary algebra: bit packing, exact XNOR-popcount products, Hamming distance and search.

Convention (the same on every backend): bits pack along the last axis into ``uint8``, element i
in bit i % 8 of byte i // 8 (``np.packbits(..., bitorder="little")``), pad bits zero. A set bit
means +1 and a clear bit -1, so for packed rows of ``n`` bits the +-1 dot product is
``n - 2 * popcount(a ^ b)`` and the Hamming distance is ``popcount(a ^ b)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .. import _dispatch
from ..errors import ShapeError
from ._validate import dtype_name, require_float, require_int

__all__ = [
    "RadiusResult",
    "binarize",
    "binary_matmul",
    "hamming_distance",
    "hamming_radius",
    "hamming_topk",
    "pack_bits",
    "unpack_bits",
]

# Distance matrices are built in blocks of about this many entries, so memory stays bounded
# for any number of queries and database codes.
_BLOCK_ENTRIES = 1 << 24


class RadiusResult(NamedTuple):
    """Matches of :func:`hamming_radius` in CSR layout: query i's matches are
    ``indices[offsets[i]:offsets[i+1]]`` (ascending) at ``distances[offsets[i]:offsets[i+1]]``.

    Example:

    >>> db = cg.pack_bits(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=bool))
    >>> res = cg.hamming_radius(db[:2], db, 1)
    >>> res.offsets.tolist(), res.indices.tolist(), res.distances.tolist()
    ([0, 2, 4], [0, 1, 0, 1], [0, 1, 1, 0])
    >>> res.indices[res.offsets[1] : res.offsets[2]].tolist()  # the matches of query 1
    [0, 1]
    """

    offsets: Any  # (Q + 1,) int64
    indices: Any  # (total,) int64
    distances: Any  # (total,) int32


# ----------------------------------------------------------------------------- validation


def _require_packed(name: str, a: Any, ndim: int | None = 2) -> None:
    if dtype_name(a) != "uint8":
        raise TypeError(f"{name} must be packed bits of dtype uint8 (see pack_bits); got {dtype_name(a)}")
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D (rows, bytes) packed bits; got shape {tuple(a.shape)}")
    if ndim is None and a.ndim < 1:
        raise ShapeError(f"{name} must have at least one dimension (bytes); got shape {tuple(a.shape)}")


def _require_same_width(a_name: str, a: Any, b_name: str, b: Any) -> None:
    _dispatch.common_kind((a_name, b_name), (a, b))
    _require_packed(a_name, a)
    _require_packed(b_name, b)
    if a.shape[-1] != b.shape[-1]:
        raise ShapeError(
            f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} have different packed widths ({a.shape[-1]} vs {b.shape[-1]} bytes)"
        )


def _require_bit_count(n: Any, width: int) -> int:
    n = require_int("n", n)
    low, high = (0, 0) if width == 0 else (8 * (width - 1) + 1, 8 * width)
    if not low <= n <= high:
        raise ValueError(f"n = {n} does not fit {width} packed bytes: expected {low} <= n <= {high}")
    return int(n)


# ----------------------------------------------------------------------------- public ops


def pack_bits(x: Any) -> Any:
    """Pack ``x`` (..., n) into uint8 (..., ceil(n / 8)), LSB first; pad bits are zero.

    A bit is set where ``x > 0`` for floating ``x`` and where ``x != 0`` for bool/integer ``x``,
    so the result equals ``np.packbits(x > 0 if float else x, axis=-1, bitorder="little")``.
    Raises ``TypeError`` for complex input, ``ShapeError`` for 0-d input.

    >>> cg.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1])).tolist()
    [13, 1]
    """
    _dispatch.array_kind(x)
    name = dtype_name(x)
    if name.startswith("complex"):
        raise TypeError(f"pack_bits takes bool, integer or real floating input; got {name}")
    if x.ndim < 1:
        raise ShapeError(f"pack_bits needs at least one dimension; got shape {tuple(x.shape)}")
    rule = "positive" if "float" in name else "nonzero"
    return _dispatch.call("pack_bits", ("x",), (x,), rule=rule)


def unpack_bits(bits: Any, n: int) -> Any:
    """Inverse of :func:`pack_bits`: uint8 (..., W) -> uint8 0/1 (..., n), 8(W-1) < n <= 8W.

    Raises ``TypeError`` (not uint8), ``ValueError`` (n does not fit W bytes).

    Example:

    >>> bits = cg.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]))
    >>> cg.unpack_bits(bits, 9).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    _dispatch.array_kind(bits)
    _require_packed("bits", bits, ndim=None)
    n = _require_bit_count(n, bits.shape[-1])
    return _dispatch.call("unpack_bits", ("bits",), (bits,), n=n)


def binarize(x: Any) -> tuple[Any, Any]:
    """Sign bits and scale of float ``x`` (..., n): ``(pack_bits(x >= 0), mean(|x|, axis=-1))``.

    ``bits`` is uint8 (..., ceil(n / 8)); ``scale`` has shape (...) and ``x``'s dtype (0 when
    n = 0), so ``scale[..., None] * (2 * unpack_bits(bits, n) - 1)`` approximates ``x``.
    Raises ``TypeError`` for non-float input.

    Example:

    >>> bits, scale = cg.binarize(np.array([[0.5, -1.5, 2.0]], dtype=np.float32))
    >>> bits.tolist(), scale.tolist()
    ([[5]], [1.3333333730697632])
    """
    _dispatch.array_kind(x)
    require_float("x", x)
    if x.ndim < 1:
        raise ShapeError(f"binarize needs at least one dimension; got shape {tuple(x.shape)}")
    bits = _dispatch.call("pack_bits", ("x",), (x,), rule="nonnegative")
    scale = _dispatch.call("mean_abs", ("x",), (x,))
    return bits, _dispatch.cast_like(scale, x)


def binary_matmul(a: Any, b: Any, n: int) -> Any:
    """Exact +-1 matrix product of packed rows: int32 (M, N) = ``n - 2 * popcount(a ^ b)``.

    ``a`` (M, W) and ``b`` (N, W) are uint8 from :func:`pack_bits` of rows of ``n`` bits,
    8(W-1) < n <= 8W. Raises ``TypeError`` (not uint8), ``ShapeError`` (widths differ),
    ``ValueError`` (n does not fit W).

    Example:

    >>> a = cg.pack_bits(np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))
    >>> cg.binary_matmul(a, a, 3).tolist()  # (+1 -1 +1) . (+1 +1 +1) = 1
    [[3, 1], [1, 3]]
    """
    _require_same_width("a", a, "b", b)
    n = _require_bit_count(n, a.shape[-1])
    return _dispatch.call("popcount_gemm", ("a", "b"), (a, b), signed_bits=n)


def hamming_distance(a: Any, b: Any) -> Any:
    """Pairwise Hamming distances of packed rows: int32 (M, N) = ``popcount(a ^ b)``.

    Raises ``TypeError`` (not uint8) and ``ShapeError`` (not 2-D, or widths differ).

    Example:

    >>> a = cg.pack_bits(np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))
    >>> cg.hamming_distance(a, a).tolist()
    [[0, 1], [1, 0]]
    """
    _require_same_width("a", a, "b", b)
    return _dispatch.call("popcount_gemm", ("a", "b"), (a, b), signed_bits=None)


def hamming_topk(q: Any, db: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` nearest database codes of each query: ``(distances int32 (Q, k), indices int64 (Q, k))``.

    Ascending by distance, ties broken by the lower database index; any 1 <= k <= len(db).
    Raises ``TypeError``, ``ShapeError`` and ``ValueError`` (k out of range, with the range).

    Example:

    >>> db = cg.pack_bits(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=bool))
    >>> distances, indices = cg.hamming_topk(db[2:], db, 2)
    >>> distances.tolist(), indices.tolist()
    ([[0, 2]], [[2, 1]])
    """
    _require_same_width("q", q, "db", db)
    k = require_int("k", k, 1, db.shape[0])
    distances, indices = _dispatch.call("hamming_topk", ("q", "db"), (q, db), k=k)
    return distances, indices


def hamming_radius(q: Any, db: Any, r: int) -> RadiusResult:
    """Every database code within Hamming distance ``r`` of each query, as a :class:`RadiusResult`.

    Raises ``TypeError``, ``ShapeError`` and ``ValueError`` (negative r).

    Example:

    >>> db = cg.pack_bits(np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=bool))
    >>> res = cg.hamming_radius(db[2:], db, 2)
    >>> res.indices.tolist(), res.distances.tolist()
    ([1, 2], [2, 0])
    """
    _require_same_width("q", q, "db", db)
    r = require_int("r", r, 0)
    return RadiusResult(*_dispatch.call("hamming_radius", ("q", "db"), (q, db), r=r))


# ----------------------------------------------------------------------------- NumPy backend


@_dispatch.register("pack_bits", "numpy")
def _pack_bits_numpy(x: np.ndarray, *, rule: str) -> np.ndarray:
    on = {"positive": x > 0, "nonnegative": x >= 0, "nonzero": x != 0}[rule]
    return np.packbits(on, axis=-1, bitorder="little")


@_dispatch.register("unpack_bits", "numpy")
def _unpack_bits_numpy(bits: np.ndarray, *, n: int) -> np.ndarray:
    return np.unpackbits(bits, axis=-1, count=n, bitorder="little")


@_dispatch.register("mean_abs", "numpy")
def _mean_abs_numpy(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] == 0:
        return np.zeros(x.shape[:-1], dtype=x.dtype)
    acc = np.float64 if x.dtype == np.float64 else np.float32
    scale: np.ndarray = np.abs(x).mean(axis=-1, dtype=acc)
    return scale


def _as_words(a: np.ndarray) -> np.ndarray:
    """(R, W) uint8 -> (R, ceil(W / 8)) uint64, zero-padded (zeros XOR to zero)."""
    r, w = a.shape
    padded = np.zeros((r, -(-w // 8) * 8), dtype=np.uint8)
    padded[:, :w] = a
    return padded.view(np.uint64)


_BLAS_MIN_ROWS = 32
_popcount = getattr(np, "bitwise_count", None)
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _plus_minus_one(a: np.ndarray) -> np.ndarray:
    """(R, W) packed bytes -> (R, 8W) float32 of +1 (set bit) / -1 (clear bit), pad bits included."""
    return np.unpackbits(a, axis=-1, bitorder="little").astype(np.float32) * 2 - 1


def _distance_blocks(q: np.ndarray, db: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, distances int32 (rows, N))`` over row blocks of ``q``.

    Through BLAS when it fits: the +-1 dot product of 8W-bit rows is an integer below 2^24,
    which float32 sums exactly in any order, and distance = (8W - dot) / 2 (pad bits are equal
    in both rows, so they add 0). Otherwise XOR and popcount on 64-bit words.
    """
    n_db, width = db.shape
    bits = 8 * width
    # unpacking the database to floats pays off only when enough query rows share it
    use_blas = q.shape[0] >= _BLAS_MIN_ROWS and bits < 2**24 and n_db * bits * 4 <= 2**31
    # bound the temporaries: (rows, N) distances plus (rows, 8W) floats, or (rows, N, W/8) words
    per_row = max(n_db, bits, 1) if use_blas else max(n_db * width, 1)
    step = max(1, _BLOCK_ENTRIES // per_row)
    if use_blas:
        db_t = _plus_minus_one(db).T
    else:
        qw, dw = _as_words(q), _as_words(db)
    for start in range(0, q.shape[0], step):
        if use_blas:
            dot = _plus_minus_one(q[start : start + step]) @ db_t
            yield start, ((bits - dot) * 0.5).astype(np.int32)
            continue
        x = qw[start : start + step, None, :] ^ dw[None, :, :]
        if _popcount is not None:
            counts = _popcount(x).sum(axis=-1, dtype=np.int32)
        else:  # NumPy < 2.0: count bytes through a table
            counts = _BYTE_POPCOUNT[x.view(np.uint8)].sum(axis=-1, dtype=np.int32)
        yield start, counts


@_dispatch.register("popcount_gemm", "numpy")
def _popcount_gemm_numpy(a: np.ndarray, b: np.ndarray, *, signed_bits: int | None) -> np.ndarray:
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    for start, d in _distance_blocks(a, b):
        out[start : start + d.shape[0]] = d if signed_bits is None else signed_bits - 2 * d
    return out


def _topk_of_block(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # One int64 key orders by distance, then index: ties go to the lower index by construction.
    n = d.shape[1]
    keys = d.astype(np.int64) * n + np.arange(n, dtype=np.int64)
    if k < n:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    return (keys // n).astype(np.int32), keys % n


@_dispatch.register("hamming_topk", "numpy")
def _hamming_topk_numpy(q: np.ndarray, db: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.empty((q.shape[0], k), dtype=np.int32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    for start, d in _distance_blocks(q, db):
        dist[start : start + d.shape[0]], idx[start : start + d.shape[0]] = _topk_of_block(d, k)
    return dist, idx


@_dispatch.register("hamming_radius", "numpy")
def _hamming_radius_numpy(q: np.ndarray, db: np.ndarray, *, r: int) -> tuple[Any, Any, Any]:
    counts = np.zeros(q.shape[0], dtype=np.int64)
    indices, distances = [], []
    for start, d in _distance_blocks(q, db):
        rows, cols = np.nonzero(d <= r)  # row-major: ascending index within each query
        counts[start : start + d.shape[0]] = np.bincount(rows, minlength=d.shape[0])
        indices.append(cols.astype(np.int64))
        distances.append(d[rows, cols])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cat = np.concatenate
    return offsets, cat(indices) if indices else np.zeros(0, np.int64), cat(distances) if distances else np.zeros(0, np.int32)


# ----------------------------------------------------------------------------- Triton backend


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_context(t: Any) -> Any:
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _unit_stride_rows(t: Any) -> Any:
    """``t`` as (rows, last) with unit stride along the last axis (copied only when needed)."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


@_dispatch.register("pack_bits", "triton")
def _pack_bits_triton(x: Any, *, rule: str) -> Any:
    import torch

    from ..kernels.binary import pack_bits_kernel

    n = x.shape[-1]
    width = _cdiv(n, 8)
    rows = _unit_stride_rows(x.view(torch.uint8) if x.dtype == torch.bool else x)
    out = torch.empty((rows.shape[0], width), dtype=torch.uint8, device=x.device)
    if out.numel():
        block_r, block_w = 16, 16
        with _launch_context(x):
            pack_bits_kernel[(_cdiv(rows.shape[0], block_r), _cdiv(width, block_w))](
                rows, out, rows.shape[0], n, width, rows.stride(0), out.stride(0),
                RULE=rule, BLOCK_R=block_r, BLOCK_W=block_w,
            )  # fmt: skip
    return out.reshape(x.shape[:-1] + (width,))


@_dispatch.register("unpack_bits", "triton")
def _unpack_bits_triton(bits: Any, *, n: int) -> Any:
    import torch

    from ..kernels.binary import unpack_bits_kernel

    rows = _unit_stride_rows(bits)
    out = torch.empty((rows.shape[0], n), dtype=torch.uint8, device=bits.device)
    if out.numel():
        block_r, block_c = 16, 64
        with _launch_context(bits):
            unpack_bits_kernel[(_cdiv(rows.shape[0], block_r), _cdiv(n, block_c))](
                rows, out, rows.shape[0], n, rows.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_C=block_c
            )
    return out.reshape(bits.shape[:-1] + (n,))


@_dispatch.register("mean_abs", "triton")
def _mean_abs_triton(x: Any) -> Any:
    import torch

    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.abs().to(acc).mean(dim=-1)


def _int32_words(a: Any) -> Any:
    """(R, W) uint8 -> (R, ceil(W / 4)) int32 view, zero-padded when W is not a multiple of 4."""
    import torch

    r, w = a.shape
    if a.numel() == 0:
        return torch.zeros((r, _cdiv(w, 4)), dtype=torch.int32, device=a.device)
    if w % 4 == 0 and a.is_contiguous() and a.data_ptr() % 4 == 0:
        return a.view(torch.int32)
    padded = torch.zeros((r, _cdiv(w, 4) * 4), dtype=torch.uint8, device=a.device)
    padded[:, :w] = a
    return padded.view(torch.int32)


def _popcount_gemm_words(a: Any, b: Any, n_bits: int | None) -> Any:
    """int32 (M, N) from int32 words (M, words) and (N, words)."""
    import torch

    from ..kernels.binary import popcount_gemm_kernel

    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if out.numel() == 0:
        return out
    block_m, block_n, block_w = 32, 32, 8
    with _launch_context(a):
        popcount_gemm_kernel[(_cdiv(m, block_m), _cdiv(n, block_n))](
            a, b, out, m, n, a.shape[1], n_bits or 0, a.stride(0), b.stride(0), out.stride(0),
            SIGNED_DOT=n_bits is not None, HW_POPC=a.device.type == "cuda",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w,
        )  # fmt: skip
    return out


@_dispatch.register("popcount_gemm", "triton")
def _popcount_gemm_triton(a: Any, b: Any, *, signed_bits: int | None) -> Any:
    return _popcount_gemm_words(_int32_words(a), _int32_words(b), signed_bits)


def _search_blocks(q: Any, db: Any) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(q_start, db_start, distances int32)`` over blocks of about _BLOCK_ENTRIES entries."""
    qw, dw = _int32_words(q), _int32_words(db)
    n = dw.shape[0]
    db_step = max(1, min(n, _BLOCK_ENTRIES))
    q_step = max(1, _BLOCK_ENTRIES // db_step)
    for qs in range(0, qw.shape[0], q_step):
        for ds in range(0, n, db_step):
            yield qs, ds, _popcount_gemm_words(qw[qs : qs + q_step], dw[ds : ds + db_step], None)


@_dispatch.register("hamming_topk", "triton")
def _hamming_topk_triton(q: Any, db: Any, *, k: int) -> tuple[Any, Any]:
    import torch

    n = db.shape[0]
    keys_per_query: dict[int, Any] = {}
    for qs, ds, d in _search_blocks(q, db):
        # distance-major int64 keys are unique, so topk's choice among ties cannot vary
        keys = d.to(torch.int64) * n + torch.arange(ds, ds + d.shape[1], device=d.device)
        best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False, sorted=False).values
        if qs in keys_per_query:
            both = torch.cat([keys_per_query[qs], best], dim=1)
            best = torch.topk(both, min(k, both.shape[1]), dim=1, largest=False, sorted=False).values
        keys_per_query[qs] = best
    keys = torch.cat([keys_per_query[s] for s in sorted(keys_per_query)]) if keys_per_query else None
    if keys is None:
        keys = torch.empty((0, k), dtype=torch.int64, device=q.device)
    keys = torch.sort(keys, dim=1).values
    return (keys // n).to(torch.int32), keys % n


@_dispatch.register("hamming_radius", "triton")
def _hamming_radius_triton(q: Any, db: Any, *, r: int) -> tuple[Any, Any, Any]:
    import torch

    counts = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    found: dict[int, list[tuple[Any, Any, Any]]] = {}
    for qs, ds, d in _search_blocks(q, db):
        rows, cols = torch.nonzero(d <= r, as_tuple=True)
        counts[qs : qs + d.shape[0]] += torch.bincount(rows, minlength=d.shape[0])
        found.setdefault(qs, []).append((rows + qs, cols + ds, d[rows, cols]))
    parts = [p for qs in sorted(found) for p in found[qs]]
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=q.device)
        return torch.zeros(q.shape[0] + 1, dtype=torch.int64, device=q.device), empty, empty.to(torch.int32)
    rows = torch.cat([p[0] for p in parts])
    cols = torch.cat([p[1] for p in parts])
    dist = torch.cat([p[2] for p in parts])
    if len(parts) > 1:  # several database blocks: restore (query, index) order
        order = torch.argsort(rows * db.shape[0] + cols)
        cols, dist = cols[order], dist[order]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=q.device), torch.cumsum(counts, 0)])
    return offsets, cols, dist


# ----------------------------------------------------------------------------- CuPy backend
# CUDA C kernels from kernels/binary.cu; scalar arguments are typed to match their C signatures.

_CUDA_CHUNK = 1024  # CHUNK in kernels/binary.cu: the per-block top-k selects from this many codes


@_dispatch.register("pack_bits", "cupy")
def _pack_bits_cupy(x: Any, *, rule: str) -> Any:
    import cupy

    from ._cupy import launch

    n = x.shape[-1]
    width = _cdiv(n, 8)
    on = {"positive": x > 0, "nonnegative": x >= 0, "nonzero": x != 0}[rule]
    rows = cupy.ascontiguousarray(on.reshape(math.prod(x.shape[:-1]), n)).view(cupy.uint8)
    out = cupy.empty((rows.shape[0], width), dtype=cupy.uint8)
    if out.size:
        launch("binary", "pack_bool_rows", (_cdiv(out.size, 256),), (256,),
               (rows, out, np.int64(rows.shape[0]), np.int32(n), np.int32(width)), like=x)  # fmt: skip
    return out.reshape(x.shape[:-1] + (width,))


@_dispatch.register("unpack_bits", "cupy")
def _unpack_bits_cupy(bits: Any, *, n: int) -> Any:
    import cupy

    from ._cupy import launch

    width = bits.shape[-1]
    rows = cupy.ascontiguousarray(bits.reshape(math.prod(bits.shape[:-1]), width))
    out = cupy.empty((rows.shape[0], n), dtype=cupy.uint8)
    if out.size:
        launch("binary", "unpack_bits_rows", (_cdiv(out.size, 256),), (256,),
               (rows, out, np.int64(rows.shape[0]), np.int32(n), np.int32(width)), like=bits)  # fmt: skip
    return out.reshape(bits.shape[:-1] + (n,))


@_dispatch.register("mean_abs", "cupy")
def _mean_abs_cupy(x: Any) -> Any:
    import cupy

    if x.shape[-1] == 0:
        return cupy.zeros(x.shape[:-1], dtype=x.dtype)
    acc = cupy.float64 if x.dtype == cupy.float64 else cupy.float32
    return cupy.abs(x).astype(acc).mean(axis=-1)


def _uint64_words(a: Any) -> Any:
    """(R, W) uint8 CuPy -> (R, ceil(W / 8)) uint64, zero-padded."""
    import cupy

    r, w = a.shape
    padded = cupy.zeros((r, _cdiv(w, 8) * 8), dtype=cupy.uint8)
    padded[:, :w] = a
    return padded.view(cupy.uint64)


def _popcount_gemm_u64(a: Any, b: Any, n_bits: int | None) -> Any:
    import cupy

    from ._cupy import launch

    m, n = a.shape[0], b.shape[0]
    out = cupy.empty((m, n), dtype=cupy.int32)
    if out.size:
        launch("binary", "popcount_gemm_u64", (_cdiv(n, 16), _cdiv(m, 16)), (16, 16),
               (a, b, out, np.int32(m), np.int32(n), np.int32(a.shape[1]), np.int32(n_bits or 0),
                np.int32(n_bits is not None)), like=a)  # fmt: skip
    return out


@_dispatch.register("popcount_gemm", "cupy")
def _popcount_gemm_cupy(a: Any, b: Any, *, signed_bits: int | None) -> Any:
    return _popcount_gemm_u64(_uint64_words(a), _uint64_words(b), signed_bits)


def _cupy_search_blocks(q: Any, db: Any) -> Iterator[tuple[int, Any]]:
    qw, dw = _uint64_words(q), _uint64_words(db)
    q_step = max(1, _BLOCK_ENTRIES // max(dw.shape[0], 1))
    for qs in range(0, qw.shape[0], q_step):
        yield qs, _popcount_gemm_u64(qw[qs : qs + q_step], dw, None)


@_dispatch.register("hamming_topk", "cupy")
def _hamming_topk_cupy(q: Any, db: Any, *, k: int) -> tuple[Any, Any]:
    import cupy

    from ._cupy import launch

    n = db.shape[0]
    if k > _CUDA_CHUNK or n >= 2**31:  # beyond the per-block selection: sort full keys
        parts = []
        for _, d in _cupy_search_blocks(q, db):
            keys = d.astype(cupy.int64) * n + cupy.arange(n, dtype=cupy.int64)
            parts.append(cupy.sort(keys, axis=1)[:, :k])
        keys = cupy.concatenate(parts) if parts else cupy.empty((0, k), dtype=cupy.int64)
        return (keys // n).astype(cupy.int32), keys % n
    qw, dw = _uint64_words(q), _uint64_words(db)
    chunks = _cdiv(n, _CUDA_CHUNK)
    cand = cupy.empty((q.shape[0], chunks * k), dtype=cupy.int64)
    if q.shape[0]:
        launch("binary", "hamming_topk_chunks", (chunks, q.shape[0]), (512,),
               (qw, dw, cand, np.int32(n), np.int32(qw.shape[1]), np.int32(k), np.int32(chunks)), like=q)  # fmt: skip
    keys = cupy.sort(cand, axis=1)[:, :k]  # merge: k smallest of all chunks' candidates
    return (keys >> 32).astype(cupy.int32), keys & 0xFFFFFFFF


@_dispatch.register("hamming_radius", "cupy")
def _hamming_radius_cupy(q: Any, db: Any, *, r: int) -> tuple[Any, Any, Any]:
    import cupy

    counts = cupy.zeros(q.shape[0], dtype=cupy.int64)
    indices, distances = [], []
    for qs, d in _cupy_search_blocks(q, db):
        rows, cols = cupy.nonzero(d <= r)
        counts[qs : qs + d.shape[0]] = cupy.bincount(rows, minlength=d.shape[0])
        indices.append(cols.astype(cupy.int64))
        distances.append(d[rows, cols])
    offsets = cupy.concatenate([cupy.zeros(1, cupy.int64), cupy.cumsum(counts)])
    if not indices:
        return offsets, cupy.zeros(0, cupy.int64), cupy.zeros(0, cupy.int32)
    return offsets, cupy.concatenate(indices), cupy.concatenate(distances)
