"""Binary algebra: bit packing, exact XNOR-popcount products, Hamming distance and search.

This module holds the public ops and their checks; one module per backend implements them
(``_numpy``, ``_triton``, ``_cupy``), and ``_search`` holds the blocked search loop, top-k merge
and CSR assembly that every backend's search shares.

Convention (the same on every backend): bits pack along the last axis into ``uint8``, element i
in bit i % 8 of byte i // 8 (``np.packbits(..., bitorder="little")``), pad bits zero. A set bit
means +1 and a clear bit -1, so for packed rows of ``n`` bits the +-1 dot product is
``n - 2 * popcount(a ^ b)`` and the Hamming distance is ``popcount(a ^ b)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ... import _dispatch
from ...errors import ShapeError
from .._validate import dtype_name, require_float, require_int, require_ndim, require_real

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
    if ndim is None:
        require_ndim(name, a, 1)


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
    Raises ``TypeError`` (not an array; complex, str, object or datetime dtype), ``ShapeError``
    (0-d input).

    >>> cg.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1])).tolist()
    [13, 1]
    """
    _dispatch.array_kind(x, "x")
    require_real("x", x)
    require_ndim("x", x, 1)
    rule = "positive" if "float" in dtype_name(x) else "nonzero"
    return _dispatch.call("pack_bits", ("x",), (x,), rule=rule)


def unpack_bits(bits: Any, n: int) -> Any:
    """Inverse of :func:`pack_bits`: uint8 (..., W) -> uint8 0/1 (..., n), 8(W-1) < n <= 8W.

    Raises ``TypeError`` (not uint8), ``ValueError`` (n does not fit W bytes).

    Example:

    >>> bits = cg.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]))
    >>> cg.unpack_bits(bits, 9).tolist()
    [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    _dispatch.array_kind(bits, "bits")
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
    _dispatch.array_kind(x, "x")
    require_float("x", x)
    require_ndim("x", x, 1)
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


# the backends register their implementations with the dispatch table on import
from . import _cupy, _numpy, _triton  # noqa: E402, F401
