"""Bad inputs, one table: every public op x every kind of bad input.

Each row calls one op with one argument spoilt in one way (or one scalar parameter of a wrong
type or range) and expects either a typed error whose message names the argument, or -- for
inputs that are valid, such as read-only, Fortran-order or NaN arrays -- a result equal to a NumPy
reference. Every row then checks that its inputs are unchanged. The NumPy/CPU paths run the whole
catalogue; a small subset runs on the Triton path (the interpreter on CPU is slow).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE

import clisonix_gpu as cg
import clisonix_gpu.torch as cgt
from clisonix_gpu import _dispatch
from clisonix_gpu import nn as cnn
from clisonix_gpu.baselines import reference_transform_matrix
from clisonix_gpu.errors import ShapeError

pytestmark = [
    pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # Inf rows, in NumPy as in ours
]

N_BITS = 11  # packed rows of 11 bits: 2 bytes, 5 pad bits


@dataclasses.dataclass(frozen=True)
class Raises:
    """The call must raise ``error`` with ``name`` (the argument) as a word in its message."""

    error: type[Exception] | tuple[type[Exception], ...]
    name: str
    before_kernels: bool = True  # raised before the dispatch table runs a backend (not for checks of the values)


VALID = "valid"  # the call must return the reference's result


@dataclasses.dataclass(frozen=True)
class Arg:
    """An array argument: a valid value, what dtypes it takes, and shapes of the wrong rank."""

    name: str
    make: Callable[[np.random.Generator], np.ndarray]
    takes: str  # "float", "real" (bool, integer or float) or "packed" (uint8 bits)
    optional: bool = False
    wrong_ndim: tuple[tuple[int, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Op:
    """A public op: its array arguments, valid scalar parameters and a NumPy reference.

    ``reference(**arrays, **params)`` gets NumPy arrays; ``view(result)`` turns the op's result
    into what is compared with it (NumPy arrays, or tuples of them).
    """

    name: str
    fn: Callable[..., Any]
    arrays: tuple[Arg, ...] = ()
    params: Callable[[], dict[str, Any]] = dict
    reference: Callable[..., Any] | None = None
    view: Callable[[Any], Any] = lambda result: result
    torch_inputs: bool = False  # arrays are passed as torch tensors on ``device``
    device: str = "cpu"
    kinds: tuple[str, ...] | None = None  # only these kinds of bad array (default: all that apply)
    overrides: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Case:
    op: Op
    label: str
    arrays: Callable[[np.random.Generator], tuple[dict[str, Any], dict[str, Any]]]  # (inputs, reference inputs)
    params: dict[str, Any]
    expect: Any

    @property
    def id(self) -> str:
        return f"{self.op.name}-{self.label}"


# ----------------------------------------------------------------------------- valid inputs


def _floats(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.standard_normal(shape).astype(np.float32)


def _low_rank(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((9, 2)) @ rng.standard_normal((2, 6))).astype(np.float32)


def _packed(rows: int) -> Callable[[np.random.Generator], np.ndarray]:
    def make(rng: np.random.Generator) -> np.ndarray:
        bits = rng.integers(0, 2, (rows, N_BITS), dtype=np.uint8)
        return np.packbits(bits, axis=-1, bitorder="little")

    return make


# ----------------------------------------------------------------------------- NumPy references


def _signs(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=n, bitorder="little").astype(np.int64) * 2 - 1


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(-1, dtype=np.int64)


def _topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = _hamming(q, db)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


def _radius(q: np.ndarray, db: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _hamming(q, db)
    hits = [np.flatnonzero(row <= r) for row in d]
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hits])])
    indices = np.concatenate([np.zeros(0, np.int64)] + hits)
    return offsets, indices, np.concatenate([np.zeros(0, np.int64)] + [row[h] for row, h in zip(d, hits)])


def _pack(x: np.ndarray) -> np.ndarray:
    return np.packbits(x > 0 if x.dtype.kind == "f" else x != 0, axis=-1, bitorder="little")


def _binarize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    scale = np.abs(x64).mean(-1) if x.shape[-1] else np.zeros(x.shape[:-1])
    return np.packbits(x64 >= 0, axis=-1, bitorder="little"), scale


def _binary_linear_reference(layer: cnn.BinaryLinear) -> Callable[..., np.ndarray]:
    def reference(x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        signs = np.where(x64 >= 0, 1.0, -1.0)
        w = _signs(layer.weight_bits.numpy(), layer.in_features).astype(np.float64)
        y = (signs @ w.T) * np.abs(x64).mean(-1, keepdims=True) * layer.weight_scale.double().numpy()
        return y + layer.bias.detach().double().numpy()

    return reference


def _liam_reference(x: np.ndarray) -> np.ndarray:
    return reference_transform_matrix(x, _LIAM.weight, _LIAM.bias, "tanh")


def _low_rank_linear_reference(x: np.ndarray) -> np.ndarray:
    first, second = (p.detach().double().numpy() for p in (_LOW.first, _LOW.second))
    return (x.astype(np.float64) @ first.T) @ second.T + _LOW.bias.detach().double().numpy()  # two GEMMs, as the layer runs


def _factor_product(lr: cg.LowRank) -> Callable[..., np.ndarray]:
    def reference(y: np.ndarray) -> np.ndarray:
        if np.isfinite(y).all():
            return lr.reconstruct() @ y
        return (lr.u * lr.s[..., None, :]) @ (lr.vh @ y)  # Inf meets the factors, not the dense matrix

    return reference


def _host(result: Any) -> Any:
    """A result as NumPy arrays (tuples kept); meta tensors stay tensors (shapes only)."""
    if isinstance(result, tuple):
        return tuple(_host(r) for r in result)
    if isinstance(result, cg.LowRank):
        return _host(result.reconstruct())
    if isinstance(result, torch.Tensor):
        return result if result.device.type == "meta" else result.detach().cpu().numpy()
    return np.asarray(result)


def _assert_matches(got: Any, want: Any) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_matches(g, w)
        return
    want = np.asarray(want)
    assert tuple(got.shape) == want.shape
    if isinstance(got, torch.Tensor):  # meta: a result of the right shape, no values
        return
    if want.dtype.kind in "biu":
        np.testing.assert_array_equal(got, want)
    else:
        scale = max(float(np.nanmax(np.abs(want[np.isfinite(want)]), initial=1.0)), 1.0)
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- the ops


def _layer(cls: type, *args: Any, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    layer = cls(*args, **kwargs)
    if isinstance(layer, cnn.BinaryLinear):
        layer.pack(torch.randn(3, 7))
    return layer.eval()


_LIAM = _layer(cnn.LIAMLinear, 7, 3, activation="tanh")
_LOW = _layer(cnn.LowRankLinear, 7, 3, 2)
_BINARY = _layer(cnn.BinaryLinear, 7, 3)
_FACTORS = cg.svd_compress(np.random.default_rng(0).standard_normal((5, 4)), k=2)
_BATCHED_FACTORS = cg.svd_compress(np.random.default_rng(0).standard_normal((2, 5, 4)), k=2)

X, W, BIAS = Arg("x", _floats(5, 7), "float"), Arg("w", _floats(3, 7), "float", wrong_ndim=((7,),)), Arg("bias", _floats(3), "float", True, ((1, 3),))
A_PACKED, B_PACKED = Arg("a", _packed(4), "packed", wrong_ndim=((2,), (1, 4, 2))), Arg("b", _packed(3), "packed", wrong_ndim=((2,),))
Q, DB = Arg("q", _packed(4), "packed", wrong_ndim=((2,),)), Arg("db", _packed(6), "packed", wrong_ndim=((1, 6, 2),))
X_REAL, X_FLOAT, BITS = Arg("x", _floats(4, N_BITS), "real"), Arg("x", _floats(4, N_BITS), "float"), Arg("bits", _packed(4), "packed")
A_MATRIX = Arg("a", _low_rank, "float", wrong_ndim=((9,),))

TRANSFORM = dict(arrays=(X, W, BIAS), params=lambda: {"activation": "relu"}, reference=reference_transform_matrix)
PACK = dict(arrays=(X_REAL,), reference=_pack)
UNPACK = dict(arrays=(BITS,), params=lambda: {"n": N_BITS}, reference=lambda bits, n: np.unpackbits(bits, axis=-1, count=n, bitorder="little"))
BINARIZE = dict(arrays=(X_FLOAT,), reference=_binarize)
MATMUL = dict(arrays=(A_PACKED, B_PACKED), params=lambda: {"n": N_BITS}, reference=lambda a, b, n: _signs(a, n) @ _signs(b, n).T)
DISTANCE = dict(arrays=(A_PACKED, B_PACKED), reference=_hamming)
TOPK = dict(arrays=(Q, DB), params=lambda: {"k": 2}, reference=_topk)
RADIUS = dict(arrays=(Q, DB), params=lambda: {"r": 3}, reference=_radius)
Y = Arg("y", _floats(4, 3), "float")
BATCHED_Y_KINDS = ("other array type", "strided view", "NaN")  # the rest as for 2-D factors
SVD_NAN = {("a", kind): Raises(ValueError, "a", before_kernels=False) for kind in ("NaN", "Inf")}  # found in the norm pass


def _svd_k(a: Any, k: int) -> Any:
    u, s, vh = cgt.svd_compress_k(a, k)
    return (u * s[..., None, :]) @ vh


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))


OPS = (
    Op("transform_matrix", cg.transform_matrix, **TRANSFORM),
    Op("svd_compress", cg.svd_compress, (A_MATRIX,), lambda: {"k": 2}, lambda a, k: a, overrides=SVD_NAN),
    Op("pack_bits", cg.pack_bits, **PACK),
    Op("unpack_bits", cg.unpack_bits, **UNPACK),
    Op("binarize", cg.binarize, **BINARIZE),
    Op("binary_matmul", cg.binary_matmul, **MATMUL),
    Op("hamming_distance", cg.hamming_distance, **DISTANCE),
    Op("hamming_topk", cg.hamming_topk, **TOPK),
    Op("hamming_radius", cg.hamming_radius, **RADIUS),
    Op("torch.transform_matrix", cgt.transform_matrix, **TRANSFORM, torch_inputs=True),
    Op("torch.svd_compress_k", _svd_k, (A_MATRIX,), lambda: {"k": 2}, lambda a, k: a, torch_inputs=True, overrides=SVD_NAN),
    Op("torch.pack_bits", cgt.pack_bits, **PACK, torch_inputs=True),
    Op("torch.unpack_bits", cgt.unpack_bits, **UNPACK, torch_inputs=True),
    Op("torch.binarize", cgt.binarize, **BINARIZE, torch_inputs=True),
    Op("torch.binary_matmul", cgt.binary_matmul, **MATMUL, torch_inputs=True),
    Op("torch.hamming_distance", cgt.hamming_distance, **DISTANCE, torch_inputs=True),
    Op("torch.hamming_topk", cgt.hamming_topk, **TOPK, torch_inputs=True),
    Op("LIAMLinear", lambda x: _LIAM(x), (X,), reference=_liam_reference, torch_inputs=True),
    Op("LowRankLinear", lambda x: _LOW(x), (X,), reference=_low_rank_linear_reference, torch_inputs=True),
    Op("BinaryLinear", lambda x: _BINARY(x), (X,), reference=_binary_linear_reference(_BINARY), torch_inputs=True),
    Op("LowRank.matmul", lambda y: _FACTORS.matmul(y), (Y,), reference=_factor_product(_FACTORS)),
    Op("LowRank.matmul batched", lambda y: _BATCHED_FACTORS.matmul(y), (Y,), reference=_factor_product(_BATCHED_FACTORS), kinds=BATCHED_Y_KINDS),
)

# The Triton path (CUDA, or the interpreter on CPU): a few kinds per op (its checks are the ones above).
TRITON_KINDS = ("None", "sparse tensor", "int32 dtype", "NaN", "Fortran order", "strided view", "empty")


def _on_triton(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with cg.use_backend("triton"):
            return fn(*args, **kwargs)

    return call


OPS += tuple(
    Op(f"triton.{op.name}", _on_triton(op.fn), op.arrays, op.params, op.reference, torch_inputs=True, device=TRITON_DEVICE, kinds=TRITON_KINDS)
    for op in OPS
    if op.name in ("transform_matrix", "pack_bits", "binary_matmul", "hamming_topk")
)

# Scalar parameters: (op name, the parameters that replace the valid ones, what must happen).
BAD_PARAMS = [
    ("transform_matrix", {"activation": 3}, Raises(TypeError, "activation")),
    ("transform_matrix", {"activation": "swish"}, Raises(ValueError, "activation")),
    ("svd_compress", {"k": 2.0}, Raises(TypeError, "k")),
    ("svd_compress", {"k": "2"}, Raises(TypeError, "k")),
    ("svd_compress", {"k": True}, Raises(TypeError, "k")),
    ("svd_compress", {"k": 0}, Raises(ValueError, "k")),
    ("svd_compress", {"k": 7}, Raises(ValueError, "k")),
    ("svd_compress", {"oversample": "10"}, Raises(TypeError, "oversample")),
    ("svd_compress", {"oversample": -1}, Raises(ValueError, "oversample")),
    ("svd_compress", {"power_iters": None}, Raises(TypeError, "power_iters")),
    ("svd_compress", {"seed": 1.5}, Raises(TypeError, "seed")),
    ("svd_compress", {"seed": -1}, Raises(ValueError, "seed")),
    ("svd_compress", {"k": None, "tol": "0.1"}, Raises(TypeError, "tol")),
    ("svd_compress", {"k": None, "tol": 1.5}, Raises(ValueError, "tol")),
    ("svd_compress", {"k": None, "tol": float("nan")}, Raises(ValueError, "tol")),
    ("unpack_bits", {"n": 11.0}, Raises(TypeError, "n")),
    ("unpack_bits", {"n": 17}, Raises(ValueError, "n")),
    ("unpack_bits", {"n": None}, Raises(TypeError, "n")),
    ("binary_matmul", {"n": True}, Raises(TypeError, "n")),
    ("binary_matmul", {"n": 8}, Raises(ValueError, "n")),
    ("binary_matmul", {"n": np.int64(11)}, VALID),
    ("hamming_topk", {"k": 1.5}, Raises(TypeError, "k")),
    ("hamming_topk", {"k": 0}, Raises(ValueError, "k")),
    ("hamming_topk", {"k": 7}, Raises(ValueError, "k")),
    ("hamming_radius", {"r": -1}, Raises(ValueError, "r")),
    ("hamming_radius", {"r": "3"}, Raises(TypeError, "r")),
    ("torch.transform_matrix", {"activation": "swish"}, Raises(ValueError, "activation")),
    ("torch.unpack_bits", {"n": 11.0}, Raises((TypeError, RuntimeError), "n")),
    ("torch.binary_matmul", {"n": 40}, Raises(ValueError, "n")),
    ("torch.hamming_topk", {"k": 1.5}, Raises((TypeError, RuntimeError), "k")),
    ("torch.svd_compress_k", {"k": 0}, Raises(ValueError, "k")),
]

# Constructors and compress: only scalar arguments; the valid call first.
CONSTRUCTORS = [
    ("LIAMLinear()", cnn.LIAMLinear, lambda: {"in_features": 7, "out_features": 3}),
    ("LowRankLinear()", cnn.LowRankLinear, lambda: {"in_features": 7, "out_features": 3, "rank": 2}),
    ("BinaryLinear()", cnn.BinaryLinear, lambda: {"in_features": 7, "out_features": 3}),
    ("compress", cnn.compress, lambda: {"model": _model(), "k": 2}),
]
BAD_PARAMS += [
    (name, params, expect)
    for name in ("LIAMLinear()", "LowRankLinear()", "BinaryLinear()")
    for params, expect in [
        ({"in_features": "7"}, Raises(TypeError, "in_features")),
        ({"in_features": 7.0}, Raises(TypeError, "in_features")),
        ({"out_features": -3}, Raises(ValueError, "out_features")),
        ({"out_features": None}, Raises(TypeError, "out_features")),
    ]
] + [
    ("LIAMLinear()", {"activation": "swish"}, Raises(ValueError, "activation")),
    ("LowRankLinear()", {"rank": 2.0}, Raises(TypeError, "rank")),
    ("LowRankLinear()", {"rank": 4}, Raises(ValueError, "rank")),
    ("compress", {"model": None}, Raises(TypeError, "model")),
    ("compress", {"model": "model"}, Raises(TypeError, "model")),
    ("compress", {"k": 2.0}, Raises(TypeError, "k")),
    ("compress", {"k": 0}, Raises(ValueError, "k")),
    ("compress", {"k": None, "tol": "0.1"}, Raises(TypeError, "tol")),
    ("compress", {"k": None, "tol": 2.0}, Raises(ValueError, "tol")),
    ("compress", {"min_params": "1"}, Raises(TypeError, "min_params")),
    ("compress", {"binary": "yes"}, Raises(TypeError, "binary")),
]

# Shapes that disagree between arguments, and empty dimensions: (op, label, replaced arrays, expect).
SHAPES = [
    ("transform_matrix", "K mismatch", {"x": _floats(5, 6)}, Raises(ShapeError, "x")),
    ("transform_matrix", "bias length", {"bias": _floats(4)}, Raises(ShapeError, "bias")),
    ("transform_matrix", "batched w, 2-D x", {"w": _floats(2, 3, 7)}, Raises(ShapeError, "x")),
    ("transform_matrix", "batch mismatch", {"x": _floats(3, 5, 7), "w": _floats(2, 3, 7), "bias": None}, Raises(ShapeError, "w")),
    ("transform_matrix", "1-D x", {"x": _floats(7)}, VALID),
    ("transform_matrix", "empty M", {"x": _floats(0, 7)}, VALID),
    ("transform_matrix", "empty K", {"x": _floats(5, 0), "w": _floats(3, 0)}, VALID),
    ("transform_matrix", "empty N", {"w": _floats(0, 7), "bias": _floats(0)}, VALID),
    ("transform_matrix", "x float64, w float32", {"x": lambda rng: rng.standard_normal((5, 7))}, Raises(TypeError, "w")),
    ("svd_compress", "empty rows", {"a": _floats(0, 6)}, Raises(ValueError, "k")),
    ("pack_bits", "empty n", {"x": _floats(4, 0)}, VALID),
    ("pack_bits", "empty rows", {"x": _floats(0, 5)}, VALID),
    ("unpack_bits", "empty rows", {"bits": _packed(0)}, VALID),
    ("binarize", "empty n", {"x": _floats(4, 0)}, VALID),
    ("binary_matmul", "width mismatch", {"b": lambda rng: np.zeros((3, 3), np.uint8)}, Raises(ShapeError, "b")),
    ("binary_matmul", "empty a", {"a": _packed(0)}, VALID),
    ("hamming_distance", "width mismatch", {"a": lambda rng: np.zeros((3, 1), np.uint8)}, Raises(ShapeError, "a")),
    ("hamming_topk", "width mismatch", {"db": lambda rng: np.zeros((6, 3), np.uint8)}, Raises(ShapeError, "db")),
    ("hamming_topk", "empty q", {"q": _packed(0)}, VALID),
    ("hamming_topk", "empty db", {"db": _packed(0)}, Raises(ValueError, "k")),
    ("hamming_radius", "empty db", {"db": _packed(0)}, VALID),
    ("hamming_radius", "width mismatch", {"q": lambda rng: np.zeros((6, 3), np.uint8)}, Raises(ShapeError, "q")),
    ("torch.transform_matrix", "K mismatch", {"x": _floats(5, 6)}, Raises(ShapeError, "x")),
    ("torch.binary_matmul", "width mismatch", {"b": lambda rng: np.zeros((3, 3), np.uint8)}, Raises(ShapeError, "b")),
    ("torch.hamming_topk", "empty q", {"q": _packed(0)}, VALID),
    ("LIAMLinear", "in_features mismatch", {"x": _floats(5, 6)}, Raises(ShapeError, "x")),
    ("LowRankLinear", "in_features mismatch", {"x": _floats(5, 6)}, Raises(ShapeError, "x")),
    ("BinaryLinear", "in_features mismatch", {"x": _floats(2, 9)}, Raises(ShapeError, "x")),
    ("BinaryLinear", "batched x", {"x": _floats(2, 5, 7)}, VALID),
    ("LowRank.matmul", "rows mismatch", {"y": _floats(5, 3)}, Raises(ShapeError, "y")),
    ("LowRank.matmul", "1-D y", {"y": _floats(4)}, VALID),
    ("LowRank.matmul batched", "1-D y", {"y": _floats(4)}, VALID),
    ("LowRank.matmul batched", "rows mismatch", {"y": _floats(5, 3)}, Raises(ShapeError, "y")),
]

# ----------------------------------------------------------------------------- kinds of bad arrays


def _torch(v: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.array(v)).to(device)


def _fortran(v: np.ndarray, device: str | None) -> Any:
    if device is None:
        return np.asfortranarray(v)
    return _torch(np.ascontiguousarray(np.swapaxes(v, -1, -2)), device).transpose(-1, -2)


def _strided(v: np.ndarray, device: str | None) -> Any:
    wide = np.repeat(v, 2, axis=-1)
    return (wide if device is None else _torch(wide, device))[..., ::2]


def _read_only(v: np.ndarray) -> np.ndarray:
    v = v.copy()
    v.flags.writeable = False
    return v


def _with(v: np.ndarray, value: float) -> np.ndarray:
    v = v.copy()
    v.flat[0] = value
    return v


def _kinds(arg: Arg, v: np.ndarray, device: str | None) -> Iterator[tuple[str, Callable[[], tuple[Any, np.ndarray]]]]:
    """(kind, () -> (spoilt input, what the reference sees)) for every kind that applies to ``arg``;
    ``device``: where the op's torch inputs live, None for NumPy inputs."""
    as_torch = device is not None

    def to(a: np.ndarray) -> Any:
        return a if device is None else _torch(a, device)

    yield "None", lambda: (None, None)
    yield "list", lambda: (v.tolist(), v)
    if not as_torch:
        yield "str dtype", lambda: (np.full(v.shape, "a"), v)
        yield "object dtype", lambda: (v.astype(object), v)
        yield "datetime64 dtype", lambda: (np.zeros(v.shape, "datetime64[s]"), v)
        yield "masked array", lambda: (np.ma.masked_array(v, mask=np.zeros(v.shape, bool)), v)
        yield "read-only", lambda: (_read_only(v), v)
        if v.ndim == 2:
            yield "np.matrix", lambda: (np.asmatrix(v), v)
    yield "other array type", lambda: (v.copy() if as_torch else _torch(v), v)
    yield "meta tensor", lambda: (_torch(v, "meta"), v)
    yield "sparse tensor", lambda: (_torch(v, device or "cpu").to_sparse(), v)
    yield "0-d", lambda: (to(v.reshape(-1)[:1].reshape(())), v)
    for shape in arg.wrong_ndim:
        yield f"{len(shape)}-D", lambda shape=shape: (to(np.zeros(shape, v.dtype)), v)
    yield "int32 dtype", lambda: (to(v.astype(np.int32)), v.astype(np.int32))
    yield "bool dtype", lambda: (to(v.astype(bool)), v.astype(bool))
    yield "complex dtype", lambda: (to(v.astype(np.complex64)), v)
    if arg.takes != "packed":
        yield "NaN", lambda: (to(_with(v, np.nan)), _with(v, np.nan))
        yield "Inf", lambda: (to(_with(v, np.inf)), _with(v, np.inf))
    if v.ndim >= 2:
        yield "Fortran order", lambda: (_fortran(v, device), v)
    yield "strided view", lambda: (_strided(v, device), v)


def _expected(op: Op, arg: Arg, kind: str) -> Any:
    if (arg.name, kind) in op.overrides:
        return op.overrides[(arg.name, kind)]
    not_a_tensor = (TypeError, RuntimeError) if op.torch_inputs else TypeError  # torch's schema check raises RuntimeError
    if kind == "None":
        return VALID if arg.optional else Raises(TypeError, arg.name)
    if kind == "other array type" and not op.torch_inputs and len(op.arrays) == 1 and not op.name.startswith("LowRank"):
        return VALID  # an op of one array serves a CPU tensor as a tensor
    if kind in ("list", "other array type"):
        return Raises(not_a_tensor, arg.name)
    if kind == "meta tensor" and op.torch_inputs and len(op.arrays) == 1 and not op.name.startswith(("LIAM", "LowRank", "Binary")):
        return VALID  # a torch op on meta tensors only infers the result's shape
    if kind == "0-d" or kind.endswith("-D"):
        return Raises(ShapeError, arg.name)
    if kind in ("int32 dtype", "bool dtype"):
        return VALID if arg.takes == "real" else Raises(TypeError, arg.name)
    if kind in ("NaN", "Inf", "read-only", "Fortran order", "strided view"):
        return VALID
    return Raises(TypeError, arg.name)


def _inputs(op: Op, rng: np.random.Generator, replaced: dict[str, Any] | None = None) -> dict[str, np.ndarray | None]:
    values: dict[str, np.ndarray | None] = {a.name: a.make(rng) for a in op.arrays}
    for name, make in (replaced or {}).items():
        values[name] = None if make is None else make(rng)
    return values


def _device(op: Op) -> str | None:
    return op.device if op.torch_inputs else None


def _convert(op: Op, values: dict[str, Any]) -> dict[str, Any]:
    return {n: _torch(v, op.device) if op.torch_inputs and isinstance(v, np.ndarray) else v for n, v in values.items()}


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items() if v is not None)


def _cases() -> Iterator[Case]:
    by_name = {op.name: op for op in OPS}
    for op in OPS:
        for arg in op.arrays:
            example = arg.make(np.random.default_rng(0))
            for kind, _ in _kinds(arg, example, _device(op)):
                if op.kinds is not None and kind not in op.kinds:
                    continue

                def arrays(rng: np.random.Generator, op: Op = op, arg: Arg = arg, kind: str = kind) -> tuple[dict[str, Any], dict[str, Any]]:
                    values = _inputs(op, rng)
                    spoilt, seen = dict(_kinds(arg, values[arg.name], _device(op)))[kind]()
                    inputs = _convert(op, values)
                    inputs[arg.name] = spoilt
                    return inputs, {**values, arg.name: seen}

                yield Case(op, f"{arg.name} {kind}", arrays, op.params(), _expected(op, arg, kind))
        if op.kinds is not None and "empty" in op.kinds:
            empty = {a.name: (lambda rng, a=a: a.make(rng)[:0]) for a in op.arrays[:1]}
            yield Case(op, "empty", lambda rng, op=op, empty=empty: (_convert(op, v := _inputs(op, rng, empty)), v), op.params(), VALID)
    for name, params, expect in BAD_PARAMS:
        if name in by_name:
            op = by_name[name]
            yield Case(op, _label(params), lambda rng, op=op: (_convert(op, v := _inputs(op, rng)), v), {**op.params(), **params}, expect)
    constructors = {label: (fn, params) for label, fn, params in CONSTRUCTORS}
    for label, (fn, params) in constructors.items():
        yield Case(Op(label, fn), "valid", lambda rng: ({}, {}), params(), VALID)
    for name, params, expect in BAD_PARAMS:
        if name in constructors:
            fn, valid = constructors[name]
            yield Case(Op(name, fn), _label(params), lambda rng: ({}, {}), {**valid(), **params}, expect)
    for name, label, replaced, expect in SHAPES:
        op = by_name[name]
        yield Case(op, label, lambda rng, op=op, replaced=replaced: (_convert(op, v := _inputs(op, rng, replaced)), v), op.params(), expect)


CASES = list(_cases())


# ----------------------------------------------------------------------------- the test


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.clone()
    if isinstance(value, np.ndarray):
        return value.copy(), value.flags.writeable, value.flags.f_contiguous
    return copy.deepcopy(value)


def _unchanged(before: Any, after: Any) -> bool:
    if isinstance(after, torch.Tensor):
        if after.device.type == "meta":
            return True
        if after.layout != torch.strided:
            before, after = before.to_dense(), after.to_dense()
        return before.dtype == after.dtype and bool(torch.equal(torch.nan_to_num(before), torch.nan_to_num(after)))
    if isinstance(after, np.ndarray):
        copy_, writeable, fortran = before
        floating = after.dtype.kind in "fc"  # equal_nan needs numbers
        same = np.array_equal(copy_, after, equal_nan=True) if floating else np.array_equal(copy_, after)
        return bool(same) and after.flags.writeable == writeable and after.flags.f_contiguous == fortran
    if isinstance(after, torch.nn.Module):
        return True  # compress rebuilds the model by design
    return bool(before == after)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, reference_inputs = case.arrays(rng)
    before = {name: _snapshot(v) for name, v in inputs.items()}
    if isinstance(case.expect, Raises):
        dispatched = []
        call = _dispatch.call
        monkeypatch.setattr(_dispatch, "call", lambda op, *args, **kwargs: (dispatched.append(op), call(op, *args, **kwargs))[1])
        with pytest.raises(case.expect.error) as caught:
            case.op.fn(**inputs, **case.params)
        assert re.search(rf"\b{re.escape(case.expect.name)}\b", str(caught.value)), f"the message does not name {case.expect.name!r}: {caught.value}"
        assert not (case.expect.before_kernels and dispatched), f"raised after the backend ran {dispatched}"
    else:
        result = case.op.fn(**inputs, **case.params)
        if case.op.reference is not None:
            arrays = {n: None if v is None else np.asarray(v) for n, v in reference_inputs.items()}
            _assert_matches(_host(case.op.view(result)), case.op.reference(**arrays, **case.params))
    for name, value in inputs.items():
        assert _unchanged(before[name], value), f"{name} was modified"


def test_catalogue_covers_every_public_op() -> None:
    """A new public op gets rows here: the catalogue names every op of the package's API."""
    covered = {case.op.name.removeprefix("torch.").removeprefix("triton.").removesuffix("()") for case in CASES}
    ops = {"transform_matrix", "svd_compress", "pack_bits", "unpack_bits", "binarize", "binary_matmul"}
    ops |= {"hamming_distance", "hamming_topk", "hamming_radius", "svd_compress_k", "compress", "LowRank.matmul"}
    ops |= {"LIAMLinear", "LowRankLinear", "BinaryLinear"}
    assert ops <= covered
    torch_ops = {name for name in cgt.__all__}
    assert torch_ops <= {case.op.name.removeprefix("torch.") for case in CASES if case.op.name.startswith("torch.")}
