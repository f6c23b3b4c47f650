"""Binary algebra against np.packbits and brute-force NumPy references, on every usable backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE

import clisonix_gpu as cg
from clisonix_gpu.ops.binary import _numba as binary_numba
from clisonix_gpu.ops.binary import _numpy as binary_numpy
from clisonix_gpu.ops.binary import _search as binary_search

BACKENDS = ["compiled", "numpy", "triton"]
LENGTHS = [1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 129, 1003]


@pytest.fixture(autouse=True)
def cpu_path(request, monkeypatch):
    """``compiled``: the numpy backend on the numba kernels; ``numpy``: the same backend on its NumPy
    code (``CLISONIX_NUMBA=0``). Tests without a backend parameter run the default path."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "numpy":
        monkeypatch.setenv("CLISONIX_NUMBA", "0")
    elif backend == "compiled":
        monkeypatch.delenv("CLISONIX_NUMBA", raising=False)
        if not binary_numba.enabled():
            pytest.skip(binary_numba.status())


def _dispatch_name(backend):
    return "numpy" if backend == "compiled" else backend


def _on(backend, *arrays):
    if backend != "triton":
        return arrays
    return tuple(torch.from_numpy(np.ascontiguousarray(a) if a.strides == () else a).to(TRITON_DEVICE) for a in arrays)


def _np(a):
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a


def _run(backend, fn, *args, **kw):
    with cg.use_backend(_dispatch_name(backend)):
        out = fn(*args, **kw)
    return tuple(_np(o) for o in out) if isinstance(out, tuple) else _np(out)


def _random_codes(rng, rows, n, duplicates=0):
    """Packed random codes; the last ``duplicates`` rows repeat earlier ones to force ties."""
    bits = rng.random((rows, n)) < 0.5
    if duplicates:
        bits[-duplicates:] = bits[rng.integers(0, max(rows - duplicates, 1), duplicates)]
    return np.packbits(bits, axis=-1, bitorder="little")


def _ref_distances(a, b, n):
    ua = np.unpackbits(a, axis=-1, count=n, bitorder="little")
    ub = np.unpackbits(b, axis=-1, count=n, bitorder="little")
    return (ua[:, None, :] != ub[None, :, :]).sum(axis=-1)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", LENGTHS + [0])
def test_pack_bits_equals_numpy_packbits(rng, backend, n):
    x = rng.standard_normal((3, 5, n))
    x[0, 0, : n // 2] = 0.0  # exact zeros are "not > 0"
    expected = np.packbits(x > 0, axis=-1, bitorder="little")
    for value in (x, x.astype(np.float32), x > 0, (x > 0).astype(np.int64), np.round(x * 3).astype(np.int32)):
        want = expected if value.dtype.kind == "f" else np.packbits(value, axis=-1, bitorder="little")
        got = _run(backend, cg.pack_bits, *_on(backend, value))
        assert got.dtype == np.uint8 and np.array_equal(got, want), value.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_bits_non_contiguous_and_bfloat16(rng, backend):
    x = rng.standard_normal((40, 130))[::3, ::2]
    got = _run(backend, cg.pack_bits, *_on(backend, x))
    assert np.array_equal(got, np.packbits(x > 0, axis=-1, bitorder="little"))
    t = torch.from_numpy(x).to(torch.bfloat16)
    with cg.use_backend(_dispatch_name(backend)):
        got = cg.pack_bits(t.to(TRITON_DEVICE) if backend == "triton" else t)
    assert np.array_equal(_np(got), np.packbits(t.float().numpy() > 0, axis=-1, bitorder="little"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", LENGTHS)
def test_unpack_bits_inverts_pack_bits(rng, backend, n):
    bits = rng.random((4, 3, n)) < 0.5
    packed = np.packbits(bits, axis=-1, bitorder="little")
    got = _run(backend, cg.unpack_bits, *_on(backend, packed), n)
    assert got.dtype == np.uint8 and np.array_equal(got, bits.astype(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 9, 64, 129])
def test_binarize(rng, backend, n):
    x = rng.standard_normal((6, n)).astype(np.float32)
    x[:, ::5] = 0.0  # zero is >= 0: bit set
    bits, scale = _run(backend, cg.binarize, *_on(backend, x))
    assert np.array_equal(bits, np.packbits(x >= 0, axis=-1, bitorder="little"))
    ref = np.abs(x.astype(np.float64)).mean(axis=-1) if n else np.zeros(6)
    assert scale.dtype == np.float32 and scale.shape == (6,)
    np.testing.assert_allclose(scale, ref, rtol=1e-6)


# ----------------------------------------------------------------------------- products


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1003])
def test_binary_matmul_is_the_exact_pm1_product(rng, backend, n):
    sa = np.where(rng.random((7, n)) < 0.5, 1.0, -1.0)
    sb = np.where(rng.random((13, n)) < 0.5, 1.0, -1.0)
    a, b = cg.pack_bits(sa), cg.pack_bits(sb)
    got = _run(backend, cg.binary_matmul, *_on(backend, a, b), n)
    assert got.dtype == np.int32
    assert np.array_equal(got, (sa @ sb.T).astype(np.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [5, 64, 200, 257])
@pytest.mark.parametrize("queries", [9, 40])  # the NumPy path uses popcount below 32 rows, BLAS above
def test_hamming_distance_brute_force(rng, backend, n, queries):
    a, b = _random_codes(rng, queries, n), _random_codes(rng, 33, n, duplicates=4)
    got = _run(backend, cg.hamming_distance, *_on(backend, a, b))
    assert got.dtype == np.int32 and np.array_equal(got, _ref_distances(a, b, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_products_with_empty_dimensions(backend):
    a = np.zeros((0, 4), np.uint8)
    b = np.packbits(np.eye(3, 32, dtype=bool), axis=-1, bitorder="little")
    assert _run(backend, cg.hamming_distance, *_on(backend, a, b)).shape == (0, 3)
    assert _run(backend, cg.binary_matmul, *_on(backend, b, a), 32).shape == (3, 0)


# ----------------------------------------------------------------------------- search


def _ref_topk(a, b, n, k):
    d = _ref_distances(a, b, n)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]  # stable: ties by lower index
    return np.take_along_axis(d, idx, axis=1), idx


@pytest.fixture(params=[False, True], ids=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    """Run searches in one block, or in tiny blocks that exercise the merge across blocks."""
    if request.param:
        monkeypatch.setattr(binary_search, "BLOCK_ENTRIES", 7)
        monkeypatch.setattr(binary_numba, "ROWS_PER_ITEM", 2)  # compiled: many work items,
        monkeypatch.setattr(binary_numba, "MIN_SEGMENT_CODES", 7)  # each over a few codes
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_hamming_topk_brute_force_with_ties(rng, backend, k, blocks):
    n = 24  # short codes: many equal distances
    q, db = _random_codes(rng, 11, n), _random_codes(rng, 40, n, duplicates=12)
    dist, idx = _run(backend, cg.hamming_topk, *_on(backend, q, db), k)
    ref_d, ref_i = _ref_topk(q, db, n, k)
    assert dist.dtype == np.int32 and idx.dtype == np.int64
    assert np.array_equal(dist, ref_d) and np.array_equal(idx, ref_i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [0, 3, 9, 64])
def test_hamming_radius_brute_force(rng, backend, r, blocks):
    n = 20
    q, db = _random_codes(rng, 9, n), _random_codes(rng, 50, n, duplicates=10)
    q[:3] = db[:3]  # queries with exact matches
    res = _run(backend, cg.hamming_radius, *_on(backend, q, db), r)
    assert isinstance(res, tuple) and len(res) == 3
    offsets, indices, distances = res
    d = _ref_distances(q, db, n)
    assert offsets.dtype == np.int64 and indices.dtype == np.int64 and distances.dtype == np.int32
    assert offsets[0] == 0 and len(offsets) == len(q) + 1
    for i in range(len(q)):
        want = np.nonzero(d[i] <= r)[0]
        assert np.array_equal(indices[offsets[i] : offsets[i + 1]], want)
        assert np.array_equal(distances[offsets[i] : offsets[i + 1]], d[i, want])


@pytest.mark.parametrize("backend", ["compiled", "numpy"])  # (the Triton path shares the NumPy path's merge)
@pytest.mark.parametrize("k", [1, 7, 700, 2500])
def test_hamming_topk_many_tiles_and_any_k(rng, backend, k, blocks):
    n = 77  # two words, the second partly filled; 2500 codes span several compiled tiles
    q, db = _random_codes(rng, 9, n), _random_codes(rng, 2500, n, duplicates=800)
    q[0] = db[1234]
    dist, idx = _run(backend, cg.hamming_topk, *_on(backend, q, db), k)
    ref_d, ref_i = _ref_topk(q, db, n, k)
    assert np.array_equal(dist, ref_d) and np.array_equal(idx, ref_i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 45, 64, 67, 200])
@pytest.mark.parametrize("rows", [7, 40])  # the NumPy path uses popcount below 32 rows, BLAS above
def test_binary_matmul_ignores_bits_past_n(rng, backend, n, rows):
    sa = np.where(rng.random((rows, n)) < 0.5, 1.0, -1.0)
    sb = np.where(rng.random((13, n)) < 0.5, 1.0, -1.0)
    a, b = cg.pack_bits(sa), cg.pack_bits(sb)
    want = (sa @ sb.T).astype(np.int32)
    noisy_b = b.copy()
    noisy_b[:, -1] |= 0xFF ^ (0xFF >> (-n % 8))  # every bit past n set
    assert np.array_equal(_run(backend, cg.binary_matmul, *_on(backend, ~a, b), n), -want)
    assert np.array_equal(_run(backend, cg.binary_matmul, *_on(backend, a, noisy_b), n), want)
    assert np.array_equal(_run(backend, cg.binary_matmul, *_on(backend, ~a, ~b), n), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,top", [(np.float32, 3.3e38), (np.float16, 65000.0)])
def test_binarize_scale_of_values_near_the_dtype_max(rng, backend, dtype, top):
    x = (top * rng.uniform(0.9, 1.0, (3, 129)) * rng.choice([-1, 1], (3, 129))).astype(dtype)
    bits, scale = _run(backend, cg.binarize, *_on(backend, x))
    assert scale.dtype == dtype and np.isfinite(scale).all()
    np.testing.assert_allclose(scale.astype(np.float64), np.abs(x.astype(np.float64)).mean(axis=-1), rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_numpy_path_runs_without_numba_and_says_so(rng, monkeypatch):
    monkeypatch.delenv("CLISONIX_NUMBA", raising=False)
    monkeypatch.setattr(binary_numba, "_load", lambda: (None, "numba is not installed (No module named 'numba')"))
    assert not binary_numba.enabled() and "numba is not installed" in binary_numba.status()
    a, b = _random_codes(rng, 5, 99), _random_codes(rng, 8, 99)
    assert np.array_equal(cg.hamming_distance(a, b), _ref_distances(a, b, 99))
    from clisonix_gpu import cli

    assert "binary ops on CPU: NumPy: numba is not installed" in cli.info()


def test_kernels_that_fail_to_compile_fall_back_to_numpy(rng, monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.delenv("CLISONIX_NUMBA", raising=False)

    def broken(kernels):
        raise RuntimeError("LLVM ERROR: cannot select")

    monkeypatch.setattr(binary_numba, "_warm_up", broken)
    binary_numba._load.cache_clear()
    try:
        assert not binary_numba.enabled() and "could not compile" in binary_numba.status()
        q, db = _random_codes(rng, 4, 30), _random_codes(rng, 9, 30)
        dist, idx = cg.hamming_topk(q, db, 3)
        assert np.array_equal(idx, _ref_topk(q, db, 30, 3)[1])
    finally:
        monkeypatch.undo()
        binary_numba._load.cache_clear()


def test_radius_result_is_named():
    q = np.packbits(np.ones((1, 8), bool), axis=-1, bitorder="little")
    res = cg.hamming_radius(q, q, 0)
    assert res.offsets.tolist() == [0, 1] and res.indices.tolist() == [0] and res.distances.tolist() == [0]


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(rng, backend):
    q, db = _on(backend, _random_codes(rng, 5, 70), _random_codes(rng, 9, 70))
    before = [a.copy() if isinstance(a, np.ndarray) else a.clone() for a in (q, db)]
    with cg.use_backend(_dispatch_name(backend)):
        cg.hamming_topk(q, db, 3)
        cg.hamming_radius(q, db, 30)
        cg.binary_matmul(q, db, 70)
    for a, a0 in zip((q, db), before):
        assert (a == a0).all()


def test_binary_algebra_methods_are_the_ops(rng):
    algebra = cg.BinaryAlgebra()
    q, db = _random_codes(rng, 4, 30), _random_codes(rng, 6, 30)
    assert np.array_equal(algebra.hamming_distance(q, db), cg.hamming_distance(q, db))
    assert np.array_equal(algebra.binary_matmul(q, db, 30), cg.binary_matmul(q, db, 30))
    assert np.array_equal(algebra.unpack_bits(algebra.pack_bits(np.ones((2, 9))), 9), np.ones((2, 9)))


# ----------------------------------------------------------------------------- bad input


def test_widths_that_differ():
    with pytest.raises(cg.ShapeError, match=r"\(2, 3\).*\(4, 5\)"):
        cg.hamming_distance(np.zeros((2, 3), np.uint8), np.zeros((4, 5), np.uint8))


@pytest.mark.parametrize("n", [0, 24, 33, 100])
def test_bit_count_that_does_not_fit_width(n):
    with pytest.raises(ValueError, match="25 <= n <= 32"):
        cg.binary_matmul(np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.uint8), n)
    with pytest.raises(ValueError, match="25 <= n <= 32"):
        cg.unpack_bits(np.zeros((2, 4), np.uint8), n)


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.float32, np.bool_])
def test_non_uint8_packed_input(dtype):
    with pytest.raises(TypeError, match="uint8"):
        cg.hamming_distance(np.zeros((2, 4), dtype), np.zeros((3, 4), dtype))


@pytest.mark.parametrize("k", [0, -1, 4])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        cg.hamming_topk(np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.uint8), k)


def test_negative_radius():
    with pytest.raises(ValueError, match=">= 0"):
        cg.hamming_radius(np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.uint8), -1)


def test_non_integer_parameters():
    with pytest.raises(TypeError):
        cg.hamming_topk(np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.uint8), 1.5)


def test_pack_bits_rejects_complex_and_scalars():
    with pytest.raises(TypeError, match="complex"):
        cg.pack_bits(np.ones(3, np.complex64))
    with pytest.raises(cg.ShapeError):
        cg.pack_bits(np.array(1.0))


def test_binarize_rejects_integers():
    with pytest.raises(TypeError, match="float"):
        cg.binarize(np.ones((2, 3), np.int32))


def test_packed_inputs_must_be_2d_for_products():
    with pytest.raises(cg.ShapeError, match="2-D"):
        cg.hamming_distance(np.zeros((2, 3, 4), np.uint8), np.zeros((3, 4), np.uint8))


def test_numpy_and_torch_mixed():
    with pytest.raises(TypeError, match="one type"):
        cg.hamming_distance(np.zeros((2, 4), np.uint8), torch.zeros((3, 4), dtype=torch.uint8))


# ----------------------------------------------------------------------------- CuPy / CUDA C


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 7, 1500])
def test_cupy_backend_matches_numpy(rng, k):
    cupy = pytest.importorskip("cupy")
    n = 77
    q, db = _random_codes(rng, 9, n), _random_codes(rng, 2100, n, duplicates=300)
    cq, cdb = cupy.asarray(q), cupy.asarray(db)
    assert np.array_equal(cupy.asnumpy(cg.hamming_distance(cq, cdb)), _ref_distances(q, db, n))
    assert np.array_equal(cupy.asnumpy(cg.binary_matmul(cq, cdb, n)), n - 2 * _ref_distances(q, db, n))
    dist, idx = cg.hamming_topk(cq, cdb, k)
    ref_d, ref_i = _ref_topk(q, db, n, k)
    assert np.array_equal(cupy.asnumpy(dist), ref_d) and np.array_equal(cupy.asnumpy(idx), ref_i)
    res = cg.hamming_radius(cq, cdb, 30)
    want = cg.hamming_radius(q, db, 30)
    for got, ref in zip(res, want):
        assert np.array_equal(cupy.asnumpy(got), ref)
    x = rng.standard_normal((5, 70)).astype(np.float32)
    assert np.array_equal(cupy.asnumpy(cg.pack_bits(cupy.asarray(x))), np.packbits(x > 0, axis=-1, bitorder="little"))
    bits = cg.pack_bits(x)
    assert np.array_equal(cupy.asnumpy(cg.unpack_bits(cupy.asarray(bits), 70)), (x > 0).astype(np.uint8))
    cbits, cscale = cg.binarize(cupy.asarray(x))
    assert np.array_equal(cupy.asnumpy(cbits), np.packbits(x >= 0, axis=-1, bitorder="little"))
    np.testing.assert_allclose(cupy.asnumpy(cscale), np.abs(x).mean(-1), rtol=1e-6)


def test_numpy_path_without_bitwise_count(rng, monkeypatch):
    monkeypatch.setattr(binary_numpy, "_popcount", None)  # NumPy < 2.0 counts bytes by table
    a, b = _random_codes(rng, 5, 99), _random_codes(rng, 8, 99)
    assert np.array_equal(cg.hamming_distance(a, b), _ref_distances(a, b, 99))
