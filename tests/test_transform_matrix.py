"""transform_matrix against the float64 reference on every backend this machine can run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, gpu_or_skip
from hypothesis import given, settings
from hypothesis import strategies as st

import clisonix_gpu as cg
from clisonix_gpu.baselines import reference_transform_matrix, transform_matrix_error_bound
from clisonix_gpu.ops import transform_matrix as transform_matrix_module

ACTS = cg.ACTIVATIONS
# relative tolerance against |x| @ |w|.T + |bias| (pre-activation) and |reference| (output rounding)
RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
ODD_SHAPES = [(1, 1, 1), (7, 5, 3), (127, 129, 7), (129, 127, 65), (3, 1003, 2)]  # (M, K, N)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(a) -> str:
    return str(a.dtype).removeprefix("torch.")


def assert_matches_reference(y, x, w, bias, activation) -> None:
    """|y - ref| <= rtol * (1.2 * (|x||w|^T + |b|) + |ref|), elementwise; 1.2 bounds every activation's slope."""
    name = _dtype_name(x)
    assert _dtype_name(y) == name
    ref = reference_transform_matrix(x, w, bias, activation)
    got = y.detach().cpu().double().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float64)
    assert got.shape == ref.shape
    bound = RTOL[name] * (1.2 * transform_matrix_error_bound(x, w, bias) + np.abs(ref))
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), f"max excess at {worst}: err {err[worst]:.3g} > bound {bound[worst]:.3g}"


def _inputs(rng, m, k, n, dtype="float32", bias=True, lead=()):
    x = rng.standard_normal(lead + (m, k))
    w = rng.standard_normal((n, k)) / np.sqrt(max(k, 1))
    b = rng.standard_normal(n) if bias else None
    if dtype in ("float64", "float32", "float16"):
        return x.astype(dtype), w.astype(dtype), None if b is None else b.astype(dtype)
    t = TORCH_DTYPES[dtype]
    return torch.from_numpy(x).to(t), torch.from_numpy(w).to(t), None if b is None else torch.from_numpy(b).to(t)


def _triton(*arrays):
    """NumPy arrays -> torch tensors where the Triton path runs (CUDA, else CPU interpreter)."""
    return [None if a is None else torch.as_tensor(a).to(TRITON_DEVICE) for a in arrays]


# ----------------------------------------------------------------------------- NumPy path


@pytest.fixture(params=["auto", "tiles", "exact"])
def cpu_gemm(request, monkeypatch):
    """Every CPU method: packed weights (float32), BLAS on checked row tiles, the exact fallback."""
    monkeypatch.setenv("CLISONIX_CPU_GEMM", request.param)
    return request.param


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_numpy_matches_reference(rng, cpu_gemm, shape, dtype, activation):
    x, w, b = _inputs(rng, *shape, dtype=dtype)
    y = cg.transform_matrix(x, w, b, activation=activation)
    assert isinstance(y, np.ndarray)
    assert_matches_reference(y, x, w, b, activation)


def test_numpy_fp32_error_at_most_twice_blas_error(rng, cpu_gemm):
    x, w, b = _inputs(rng, 64, 1003, 33)
    ref = reference_transform_matrix(x, w, b)
    ours = np.abs(cg.transform_matrix(x, w, b) - ref).max()
    blas = np.abs((x @ w.T + b) - ref).max()
    assert ours <= 2 * blas


@given(
    m=st.integers(0, 9),
    k=st.integers(0, 70),
    n=st.integers(0, 9),
    lead=st.lists(st.integers(1, 3), max_size=2),
    has_bias=st.booleans(),
    activation=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_numpy_property(m, k, n, lead, has_bias, activation, seed):
    x, w, b = _inputs(np.random.default_rng(seed), m, k, n, bias=has_bias, lead=tuple(lead))
    y = cg.transform_matrix(x, w, b, activation=activation)
    assert y.shape == tuple(lead) + (m, n)
    assert_matches_reference(y, x, w, b, activation)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_torch_cpu_tensors(rng, dtype):
    x, w, b = _inputs(rng, 17, 33, 9, dtype=dtype)
    if not isinstance(x, torch.Tensor):
        x, w, b = (torch.from_numpy(a) for a in (x, w, b))
    y = cg.transform_matrix(x, w, b, activation="gelu")
    assert isinstance(y, torch.Tensor) and y.device.type == "cpu"
    assert_matches_reference(y, x, w, b, "gelu")


# ----------------------------------------------------------------------------- Triton path


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(7, 5, 3), (33, 70, 45)] + ([(129, 1003, 257)] if HAS_CUDA else []))
def test_triton_matches_reference(rng, shape, dtype, activation):
    x, w, b = _triton(*_inputs(rng, *shape, dtype=dtype))
    with cg.use_backend("triton"):
        y = cg.transform_matrix(x, w, b, activation=activation)
    assert y.device == x.device
    assert_matches_reference(y, x, w, b, activation)


def test_triton_fp32_error_at_most_twice_torch_error(rng):
    x, w, b = _triton(*_inputs(rng, 40, 300, 33))
    ref = reference_transform_matrix(x, w, b)
    with cg.use_backend("triton"):
        ours = np.abs(cg.transform_matrix(x, w, b).double().cpu().numpy() - ref).max()
    theirs = np.abs(torch.nn.functional.linear(x, w, b).double().cpu().numpy() - ref).max()
    assert ours <= 2 * theirs + 1e-7


def test_triton_float64(rng):
    x, w, b = _triton(*_inputs(rng, 9, 20, 5, dtype="float64"))
    with cg.use_backend("triton"):
        y = cg.transform_matrix(x, w, b, activation="tanh")
    assert_matches_reference(y, x, w, b, "tanh")


@pytest.mark.gpu
def test_cuda_tensors_pick_triton_automatically(rng):
    x, w, b = _triton(*_inputs(rng, 65, 130, 33))
    y = cg.transform_matrix(x, w, b, activation="silu")
    assert y.is_cuda
    assert_matches_reference(y, x, w, b, "silu")


@pytest.mark.gpu
def test_cupy_arrays(rng):
    gpu_or_skip()
    cupy = pytest.importorskip("cupy") if not cg.backends()[2].usable else __import__("cupy")
    x, w, b = (cupy.asarray(a) for a in _inputs(rng, 31, 64, 17))
    y = cg.transform_matrix(x, w, b, activation="relu")
    assert isinstance(y, cupy.ndarray)
    assert_matches_reference(cupy.asnumpy(y), *(cupy.asnumpy(a) for a in (x, w, b)), "relu")


# ----------------------------------------------------------------------------- both paths

BACKENDS = ["numpy", "triton"]


def _run(backend, x, w, b=None, activation=None):
    if backend == "triton":
        x, w, b = _triton(x, w, b)
    with cg.use_backend(backend):
        y = cg.transform_matrix(x, w, b, activation=activation)
    return y.cpu().numpy() if isinstance(y, torch.Tensor) else y


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_bitwise(rng, backend, cpu_gemm):
    if backend == "triton" and cpu_gemm != "auto":
        pytest.skip("the CPU method does not reach the Triton path")
    m, k, n = 300, (1003 if backend == "numpy" else 33), (129 if backend == "numpy" else 17)
    x, w, b = _inputs(rng, m, k, n)
    full = _run(backend, x, w, b, "gelu")
    rows = range(m) if backend == "numpy" else [0, 1, 31, 32, 33, 150, 299]
    for i in rows:
        single = _run(backend, x[i : i + 1], w, b, "gelu")
        assert np.array_equal(single[0], full[i]), f"row {i} differs between a 1-row and a {m}-row call"
    middle = _run(backend, x[100:217], w, b, "gelu")
    assert np.array_equal(middle, full[100:217])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(rng, backend):
    x_big = rng.standard_normal((40, 2 * 37)).astype(np.float32)
    w_big = rng.standard_normal((2 * 37, 23)).astype(np.float32)
    x = x_big[::3, ::2]  # strided rows and columns
    w = w_big.T[:, ::2]  # transposed view: stride(-1) != 1
    b = rng.standard_normal(46).astype(np.float32)[::2]
    assert not x.flags.c_contiguous and not w.flags.c_contiguous and not b.flags.c_contiguous
    y = _run(backend, x, w, b, "relu")
    assert_matches_reference(y, x, w, b, "relu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape,w_shape",
    [((0, 5), (3, 5)), ((4, 5), (0, 5)), ((2, 0, 5), (3, 5)), ((4, 0), (3, 0)), ((2, 3, 4, 5), (6, 5)), ((5,), (3, 5))],
)
def test_shapes_and_empty_dimensions(rng, backend, x_shape, w_shape):
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    y = _run(backend, x, w, b, "sigmoid")
    assert y.shape == x_shape[:-1] + (w_shape[0],)
    assert_matches_reference(y, x, w, b, "sigmoid")  # K = 0 gives sigmoid(bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_weights(rng, backend):
    x = rng.standard_normal((3, 9, 13)).astype(np.float32)
    w = rng.standard_normal((3, 5, 13)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    y = _run(backend, x, w, b, "leaky_relu")
    assert y.shape == (3, 9, 5)
    assert_matches_reference(y, x, w, b, "leaky_relu")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NumPy sees NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(rng, backend, cpu_gemm):
    if backend == "triton" and cpu_gemm != "auto":
        pytest.skip("the CPU method does not reach the Triton path")
    x, w, b = _inputs(rng, 6, 9, 4)
    x[1, 3], x[2, 0], w[3, 5] = np.nan, np.inf, -np.inf
    y = _run(backend, x, w, b)
    ref = reference_transform_matrix(x, w, b)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_numpy_rows_across_row_blocks(rng, monkeypatch):
    """Rows of x go through the exact GEMM in blocks while w is split once: results equal one-row
    calls bit for bit on both sides of a block border, with non-finite rows in two blocks."""
    monkeypatch.setenv("CLISONIX_CPU_GEMM", "exact")
    monkeypatch.setattr(transform_matrix_module, "_NUMPY_ROW_BLOCK", 7)
    x, w, b = _inputs(rng, 23, 9, 4)
    x[3, 2], x[15, 0], w[1, 4] = np.nan, np.inf, np.inf
    full = cg.transform_matrix(x, w, b, activation="tanh")
    for i in range(23):
        assert np.array_equal(cg.transform_matrix(x[i : i + 1], w, b, activation="tanh")[0], full[i], equal_nan=True), i
    ref = reference_transform_matrix(x, w, b, "tanh")
    np.testing.assert_array_equal(np.isnan(full), np.isnan(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(full[finite], ref[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(rng, backend):
    x, w, b = _inputs(rng, 12, 10, 6)
    if backend == "triton":
        x, w, b = _triton(x, w, b)
    before = [a.clone() if isinstance(a, torch.Tensor) else a.copy() for a in (x, w, b)]
    with cg.use_backend(backend):
        cg.transform_matrix(x, w, b, activation="relu")
    for a, a0 in zip((x, w, b), before):
        assert (a == a0).all()


def test_binary_algebra_method_is_the_op(rng):
    x, w, b = _inputs(rng, 5, 6, 7)
    np.testing.assert_array_equal(cg.BinaryAlgebra().transform_matrix(x, w, b), cg.transform_matrix(x, w, b))


# ----------------------------------------------------------------------------- bad input


def test_k_mismatch_names_both_shapes():
    with pytest.raises(cg.ShapeError, match=r"\(4, 5\).*\(3, 6\)"):
        cg.transform_matrix(np.ones((4, 5), np.float32), np.ones((3, 6), np.float32))


@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape",
    [((4, 5), (3, 5), (4,)), ((4, 5), (5,), None), ((2, 4, 5), (3, 3, 5), None), ((4, 5), (2, 3, 5), None)],
)
def test_other_shape_errors(x_shape, w_shape, b_shape):
    b = None if b_shape is None else np.ones(b_shape, np.float32)
    with pytest.raises(cg.ShapeError):
        cg.transform_matrix(np.ones(x_shape, np.float32), np.ones(w_shape, np.float32), b)


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError, match="gelu_tanh"):
        cg.transform_matrix(np.ones((2, 2)), np.ones((2, 2)), activation="swish")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.bool_])
def test_non_float_dtypes_rejected(dtype):
    with pytest.raises(TypeError, match="float32"):
        cg.transform_matrix(np.ones((2, 2), dtype), np.ones((2, 2), dtype))


def test_mixed_dtypes_rejected():
    with pytest.raises(TypeError, match="one dtype"):
        cg.transform_matrix(np.ones((2, 2), np.float32), np.ones((2, 2), np.float64))


def test_numpy_mixed_with_torch_rejected():
    with pytest.raises(TypeError, match="one type"):
        cg.transform_matrix(np.ones((2, 2), np.float32), torch.ones(2, 2))


def test_tensors_on_two_devices_rejected():
    # a meta tensor holds no data and is refused by name; CPU with CUDA is the real two-device case
    with pytest.raises(TypeError, match="w is on the meta device"):
        cg.transform_matrix(torch.ones(2, 2), torch.ones(2, 2, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="one device"):
            cg.transform_matrix(torch.ones(2, 2), torch.ones(2, 2, device="cuda"))


def test_unusable_backend_says_what_to_install():
    if cg.backends()[2].usable:
        pytest.skip("CuPy is usable here")
    with pytest.raises(cg.BackendUnavailable, match="(?i)install|device"):
        with cg.use_backend("cupy"):
            pass
