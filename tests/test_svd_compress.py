"""svd_compress against exact SVD (numpy.linalg.svd) tail energies, on every usable backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE

import clisonix_gpu as cg
from clisonix_gpu.ops import svd_compress as svd_module


def _matrix(rng, m, n, spectrum, noise=0.0):
    """A = U diag(spectrum) V^T (+ noise) with random orthonormal U, V; returns (A, exact singular values)."""
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    a = (u * spectrum[:r]) @ v.T + noise * rng.standard_normal((m, n))
    return a, np.linalg.svd(a, compute_uv=False)


def _tail(sigma, k):
    return float(np.sqrt(np.sum(sigma[k:] ** 2)))


def _decaying(r):
    return 0.8 ** np.arange(r)


def _noisy_low_rank(r):
    return np.where(np.arange(r) < 10, 10.0 * 0.9 ** np.arange(r), 0.0)


def _np(t):
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


@pytest.mark.parametrize("spectrum,noise", [(_decaying, 0.0), (_noisy_low_rank, 1e-3)], ids=["decaying", "noisy-low-rank"])
@pytest.mark.parametrize("shape,k", [((200, 150), 10), ((127, 129), 7), ((129, 127), 20), ((7, 1), 1), ((1, 7), 1)])
def test_error_close_to_optimal_tail_fp64(rng, spectrum, noise, shape, k):
    a, sigma = _matrix(rng, *shape, spectrum(min(shape)), noise)
    lr = cg.svd_compress(a, k=k)
    assert lr.u.shape == (shape[0], k) and lr.s.shape == (k,) and lr.vh.shape == (k, shape[1])
    err = np.linalg.norm(a - lr.reconstruct())
    assert err <= 1.05 * _tail(sigma, k) + 1e-12 * sigma[0]
    assert np.all(np.diff(lr.s) <= 0)
    if spectrum is _decaying:
        np.testing.assert_allclose(lr.s, sigma[:k], rtol=1e-4)
    assert lr.error_estimate == pytest.approx(err / np.linalg.norm(a), rel=1e-4, abs=1e-7)


def test_float32_error_close_to_optimal_tail(rng):
    a, sigma = _matrix(rng, 300, 200, _decaying(200))
    lr = cg.svd_compress(a.astype(np.float32), k=12)
    assert lr.u.dtype == np.float32
    assert np.linalg.norm(a - lr.reconstruct().astype(np.float64)) <= 1.05 * _tail(sigma, 12)
    np.testing.assert_allclose(lr.s, sigma[:12], rtol=1e-4)


def test_batched_inputs_checked_matrix_by_matrix(rng):
    mats = [_matrix(rng, 40, 33, _decaying(33) * (i + 1)) for i in range(6)]
    a = np.stack([m for m, _ in mats]).reshape(2, 3, 40, 33)
    lr = cg.svd_compress(a, k=5)
    assert lr.u.shape == (2, 3, 40, 5) and lr.s.shape == (2, 3, 5) and lr.vh.shape == (2, 3, 5, 33)
    dense = lr.reconstruct().reshape(6, 40, 33)
    for i, (m, sigma) in enumerate(mats):
        assert np.linalg.norm(m - dense[i]) <= 1.05 * _tail(sigma, 5)
        single = cg.svd_compress(m, k=5)
        np.testing.assert_allclose(lr.s.reshape(6, 5)[i], single.s, rtol=1e-10)


@pytest.mark.parametrize("tol", [0.3, 0.05, 1e-3])
def test_tol_mode_meets_bound_with_near_optimal_rank(rng, tol):
    mats = [_matrix(rng, 80, 60, _decaying(60) ** (1 + i / 2)) for i in range(3)]
    a = np.stack([m for m, _ in mats])
    lr = cg.svd_compress(a, tol=tol)
    dense = lr.reconstruct()
    for i, (m, sigma) in enumerate(mats):
        true = np.linalg.norm(m - dense[i]) / np.linalg.norm(m)
        assert true <= tol * (1 + 1e-6)
        optimal = next(r for r in range(1, 61) if _tail(sigma, r) / np.linalg.norm(sigma) <= tol)
        assert lr.ranks[i] <= optimal + 10
        assert lr.error_estimate[i] == pytest.approx(true, rel=1e-4, abs=1e-9)
        assert np.all(lr.s[i, lr.ranks[i] :] == 0)


def test_tol_mode_full_rank_when_needed(rng):
    a = rng.standard_normal((12, 9))  # flat spectrum: only the full rank gets to 1e-6
    lr = cg.svd_compress(a, tol=1e-6)
    assert lr.rank == 9 and np.linalg.norm(a - lr.reconstruct()) / np.linalg.norm(a) < 1e-6


def test_same_seed_bit_identical_and_signs_fixed(rng):
    a, _ = _matrix(rng, 90, 70, _decaying(70), noise=1e-2)
    one, two = cg.svd_compress(a, k=6, seed=7), cg.svd_compress(a, k=6, seed=7)
    for x, y in ((one.u, two.u), (one.s, two.s), (one.vh, two.vh)):
        assert np.array_equal(x, y)
    pivot = one.u[np.argmax(np.abs(one.u), axis=0), np.arange(6)]
    assert np.all(pivot > 0)
    other = cg.svd_compress(a, k=6, seed=8, power_iters=0)
    assert not np.array_equal(other.u, one.u)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpy_and_triton_paths_agree(rng, dtype):
    a, _ = _matrix(rng, 70, 45, _decaying(45))
    a = np.stack([a, 2 * a]).astype(dtype)
    ref = cg.svd_compress(a, k=5, seed=3)
    with cg.use_backend("triton"):
        got = cg.svd_compress(torch.from_numpy(a).to(TRITON_DEVICE), k=5, seed=3)
    assert isinstance(got.u, torch.Tensor) and got.u.device.type == TRITON_DEVICE
    for x, y in ((got.u, ref.u), (got.s, ref.s), (got.vh, ref.vh)):
        np.testing.assert_allclose(_np(x), y, rtol=1e-4, atol=1e-4 * float(ref.s.max()))
    with cg.use_backend("triton"):
        again = cg.svd_compress(torch.from_numpy(a).to(TRITON_DEVICE), k=5, seed=3)
    assert torch.equal(again.u, got.u)


def test_triton_tol_mode(rng):
    a, sigma = _matrix(rng, 50, 40, _decaying(40))
    with cg.use_backend("triton"):
        lr = cg.svd_compress(torch.from_numpy(a).to(TRITON_DEVICE), tol=0.05)
    assert np.linalg.norm(a - _np(lr.reconstruct())) / np.linalg.norm(a) <= 0.05


def test_low_rank_object(rng):
    a, _ = _matrix(rng, 60, 50, _decaying(50))
    lr = cg.svd_compress(a, k=8)
    y = rng.standard_normal((50, 3))
    np.testing.assert_allclose(lr.matmul(y), lr.reconstruct() @ y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lr.matmul(y[:, 0]), lr.reconstruct() @ y[:, 0], rtol=1e-10, atol=1e-12)
    assert np.array_equal(np.asarray(lr), lr.reconstruct())
    assert lr.rank == 8 and lr.nbytes == 8 * (60 * 8 + 8 + 8 * 50)
    assert lr.compression_ratio == pytest.approx(60 * 50 * 8 / lr.nbytes)
    assert "rank=8" in repr(lr)


def test_torch_cpu_input_and_dlpack(rng):
    a, _ = _matrix(rng, 30, 20, _decaying(20))
    t = torch.from_numpy(a).to(torch.bfloat16)
    lr = cg.svd_compress(t, k=4)
    assert lr.u.dtype == torch.bfloat16 and isinstance(lr.s, torch.Tensor)
    assert torch.equal(torch.from_dlpack(lr), lr.reconstruct())
    assert cg.BinaryAlgebra().svd_compress(t, k=4).s.tolist() == lr.s.tolist()


def test_input_not_modified(rng):
    a, _ = _matrix(rng, 30, 20, _decaying(20))
    before = a.copy()
    cg.svd_compress(a, k=3)
    cg.svd_compress(a, tol=0.1)
    assert np.array_equal(a, before)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k": 0}, ValueError, r"1 <= k <= 4"),
        ({"k": 5}, ValueError, r"1 <= k <= 4"),
        ({}, ValueError, "exactly one"),
        ({"k": 2, "tol": 0.1}, ValueError, "exactly one"),
        ({"tol": 0.0}, ValueError, "0 < tol < 1"),
        ({"tol": 1.0}, ValueError, "0 < tol < 1"),
        ({"k": 2.5}, TypeError, "int"),
        ({"k": 2, "oversample": -1}, ValueError, ">= 0"),
    ],
)
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        cg.svd_compress(np.ones((4, 6)), **kwargs)


def test_bad_arrays(rng):
    with pytest.raises(cg.ShapeError):
        cg.svd_compress(np.ones(5), k=1)
    with pytest.raises(TypeError):
        cg.svd_compress(np.ones((4, 4), np.int32), k=1)
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (np.float64, np.float32):
            a = rng.standard_normal((3, 4, 5)).astype(dtype)
            a[2, 1, 3] = bad  # in the last matrix of a batch
            for array in (a, torch.from_numpy(a)):
                with pytest.raises(ValueError, match="NaN or Inf"):
                    cg.svd_compress(array, k=1)


@pytest.mark.parametrize("scale", [1e25, 1e-25])
@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch-cpu"])
def test_float32_extreme_scales_are_finite_input(rng, scale, as_torch):
    """Entries whose squares leave float32's range are still finite input: no NaN/Inf error, and
    the error estimate and tol= rank stay right."""
    a, sigma = _matrix(rng, 60, 40, _decaying(40))
    a32 = (a * scale).astype(np.float32)
    array = torch.from_numpy(a32) if as_torch else a32
    lr = cg.svd_compress(array, k=8)
    assert np.isclose(float(lr.error_estimate), _tail(sigma, 8) / np.sqrt(np.sum(sigma**2)), rtol=1e-3)
    by_tol = cg.svd_compress(array, tol=0.05)
    optimal = int(np.argmax(np.sqrt(1 - np.cumsum(sigma**2) / np.sum(sigma**2)) <= 0.05)) + 1
    assert optimal <= by_tol.rank <= optimal + 1 and float(by_tol.error_estimate) <= 0.05


def test_torch_cpu_path_agrees_with_numpy_path(rng):
    a, _ = _matrix(rng, 50, 40, _decaying(40))
    ref = cg.svd_compress(a, k=6, seed=11)
    got = cg.svd_compress(torch.from_numpy(a), k=6, seed=11)  # torch's own CPU kernels, same sketch
    for x, y in ((got.u, ref.u), (got.s, ref.s), (got.vh, ref.vh)):
        np.testing.assert_allclose(_np(x), y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_small_svd_of_wide_matrices_goes_through_r(rng, dtype, kind):
    """The projected matrices are wide: their SVD goes through a QR and an r x r SVD."""
    module = svd_module
    b = rng.standard_normal((5, 18, 64)).astype(dtype)
    b[1] *= 1e-3  # a batch member on another scale
    ops = module._NumpyOps if kind == "numpy" else module._TorchCpuOps
    w, s, vh = module._small_svd(b if kind == "numpy" else torch.from_numpy(b), ops)
    w, s, vh = _np(w), _np(s), _np(vh)
    s_ref = np.linalg.svd(b.astype(np.float64), compute_uv=False)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(s, s_ref, rtol=tol * 10, atol=0)
    np.testing.assert_allclose(w @ (s[..., None] * vh), b, rtol=0, atol=tol * 10 * np.abs(b).max())
    eye = np.broadcast_to(np.eye(18), (5, 18, 18))
    np.testing.assert_allclose(vh @ np.swapaxes(vh, -1, -2), eye, atol=tol * 10)
    np.testing.assert_allclose(np.swapaxes(w, -1, -2) @ w, eye, atol=tol * 10)
    assert np.all(np.diff(s, axis=-1) <= 0)  # descending, as a direct SVD returns them


def _triton_qr(y):
    module = svd_module
    assert module._fits_one_program(y)
    return module._householder_qr(y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 7, 3), (3, 64, 18), (2, 127, 7), (2, 31, 31)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_triton_batched_qr_matches_lapack(rng, dtype, shape, layout):
    """The Triton QR of small matrices gives LAPACK's factors (same signs) for full-rank input."""
    b, m, n = shape
    y = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    if layout == "transposed":  # how the small SVD hands over its projected matrices
        y = y.transpose(-1, -2).contiguous().transpose(-1, -2)
    before = y.clone()
    q, r = _triton_qr(y.to(TRITON_DEVICE))
    assert q.shape == (b, m, n) and r.shape == (b, n, n) and q.dtype == dtype
    assert torch.equal(y, before)
    q, r, y64 = _np(q), _np(r), _np(y)
    q_ref, r_ref = np.linalg.qr(y64)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(n), (b, n, n)), atol=tol * 10)
    np.testing.assert_allclose(q @ r, y64, rtol=0, atol=tol * 10 * np.abs(y64).max())
    assert np.all(np.tril(r, -1) == 0)
    # two backward-stable QRs differ by up to cond(y) times the rounding error
    cond = float(np.linalg.cond(y64).max())
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=tol * 10 * cond)
    np.testing.assert_allclose(r, r_ref, rtol=0, atol=tol * 10 * cond * np.abs(r_ref).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_batched_qr_of_rank_deficient_zero_and_extreme_matrices(rng, dtype):
    """Columns that are dependent or zero still give orthonormal q with q @ r = y."""
    low_rank = rng.standard_normal((40, 2)) @ rng.standard_normal((2, 6))
    zero_column = rng.standard_normal((40, 6))
    zero_column[:, 2] = 0.0
    huge = rng.standard_normal((40, 6)) * (1e25 if dtype == torch.float32 else 1e250)  # squares overflow
    batch = np.stack([low_rank, zero_column, np.zeros((40, 6)), huge])
    q, r = _triton_qr(torch.from_numpy(batch).to(dtype).to(TRITON_DEVICE))
    q, r = _np(q), _np(r)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(r))
    for i in range(4):
        np.testing.assert_allclose(q[i].T @ q[i], np.eye(6), atol=tol * 10)
        np.testing.assert_allclose(q[i] @ r[i], batch[i], rtol=0, atol=tol * 10 * max(np.abs(batch[i]).max(), 1.0))
    np.testing.assert_allclose(np.abs(np.diag(r[3])), np.abs(np.diag(np.linalg.qr(huge)[1])), rtol=tol * 10)


def test_qr_routing_by_tile_size(rng):
    """Tiles over 16 KiB (they would spill registers) and wide matrices go to torch's QR."""
    module = svd_module
    fits = module._fits_one_program
    assert fits(torch.empty(3, 64, 64)) and fits(torch.empty(3, 256, 16)) and fits(torch.empty(3, 64, 32, dtype=torch.float64))
    assert not fits(torch.empty(3, 256, 17)) and not fits(torch.empty(3, 64, 64, dtype=torch.float64)) and not fits(torch.empty(3, 4, 5))
    y = torch.from_numpy(rng.standard_normal((2, 300, 40))).to(TRITON_DEVICE)
    q, r = module._TorchOps.qr_factors(y)
    np.testing.assert_allclose(_np(q @ r), _np(y), atol=1e-12 * float(y.abs().max()))


@pytest.mark.gpu
def test_gpu_batch_of_small_matrices_matches_numpy_path(rng):
    a, _ = _matrix(rng, 64, 64, _decaying(64))
    batch = np.stack([a * (1 + i) for i in range(64)])
    ref = cg.svd_compress(batch, k=8, seed=4)
    got = cg.svd_compress(torch.from_numpy(batch).cuda(), k=8, seed=4)
    np.testing.assert_allclose(_np(got.s), ref.s, rtol=1e-8)
    np.testing.assert_allclose(_np(got.reconstruct()), ref.reconstruct(), rtol=0, atol=1e-8 * np.abs(batch).max())


# ----------------------------------------------------------------------------- zero matrices


@pytest.mark.parametrize("kind", ["numpy", "torch-cpu", "triton"])
def test_zero_matrix_has_error_zero_at_rank_one(kind):
    a = np.zeros((3, 9, 6), np.float32)
    a[1] = np.random.default_rng(0).standard_normal((9, 6))  # batched: judged per matrix
    arr = a if kind == "numpy" else torch.from_numpy(a).to(TRITON_DEVICE if kind == "triton" else "cpu")
    with cg.use_backend("triton" if kind == "triton" else "auto"):
        fixed = cg.svd_compress(arr, k=2)
        chosen = cg.svd_compress(arr, tol=0.05)
        single = cg.svd_compress(arr[0], tol=0.05)
    assert fixed.error_estimate[0] == 0.0 and fixed.error_estimate[2] == 0.0 and fixed.error_estimate[1] > 0.05
    assert list(chosen.ranks[[0, 2]]) == [1, 1] and chosen.ranks[1] > 1 and chosen.error_estimate[0] == 0.0
    assert single.rank == 1 and single.error_estimate == 0.0
    for lr in (fixed, chosen):
        dense = np.asarray(lr)
        assert np.isfinite(dense).all() and not dense[0].any() and not dense[2].any()
    assert not np.asarray(single).any()


# ----------------------------------------------------------------------------- LowRank.matmul


@pytest.mark.parametrize("batch", [(), (3,)])
def test_low_rank_matmul_takes_vectors_and_broadcast_matrices(rng, batch):
    a = rng.standard_normal(batch + (7, 5))
    lr = cg.svd_compress(a, k=5)
    for y in (rng.standard_normal(5), rng.standard_normal((5, 2)), rng.standard_normal((4,) + batch + (5, 2))):
        np.testing.assert_allclose(lr.matmul(y), a @ y, atol=1e-10)
    t = cg.svd_compress(torch.from_numpy(a), k=5)
    y = torch.from_numpy(rng.standard_normal(5))
    torch.testing.assert_close(t.matmul(y), torch.from_numpy(a) @ y)


def test_low_rank_matmul_bad_y_names_it(rng):
    lr = cg.svd_compress(rng.standard_normal((3, 7, 5)), k=2)
    with pytest.raises(cg.ShapeError, match=r"y \(4,\) .* N = 5 .* \(3, 7, 5\)"):
        lr.matmul(rng.standard_normal(4))
    with pytest.raises(cg.ShapeError, match=r"y \(5, 4, 2\)"):
        lr.matmul(rng.standard_normal((5, 4, 2)))
    with pytest.raises(cg.ShapeError, match=r"y \(2, 5, 2\): leading dimensions \(2,\) .* \(3,\)"):
        lr.matmul(rng.standard_normal((2, 5, 2)))
    with pytest.raises(cg.ShapeError, match=r"y \(\)"):
        lr.matmul(np.ones(()))
    with pytest.raises(TypeError, match="y: torch"):
        lr.matmul(torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="y has dtype int64"):
        lr.matmul(np.ones(5, np.int64))
    t = cg.svd_compress(torch.randn(7, 5), k=2)
    with pytest.raises(TypeError, match="y has dtype float64"):
        t.matmul(torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="y: numpy"):
        t.matmul(np.ones(5, np.float32))
