"""The CPU path of transform_matrix: batch invariance bit for bit, per thread count, on both methods.

What is swept (chosen to keep CI time low while covering every boundary of the row tiling):
- every M from 1 to 300 against the 300-row call at (K, N) = (3, 5), (129, 7), (64, 1), (30, 19)
  and (333, 77), NumPy and torch inputs, float32 and float64, float16 (NumPy and torch) and
  bfloat16, with bias; the activation cycles with M so each one meets every tile remainder (in
  float32 the first three take the dot products for narrow weights, the last two MKL's packed
  GEMM with its compiled caller);
- K = 4096 (N = 33) on M = 1..17, the odd M up to 75 and the tile borders up to 300, and the
  same M at (1031, 2049), a weight large enough for the pack made directly in NumPy's memory;
- every activation on every M at (129, 7);
- torch thread counts 1 and 2, switched in the middle of the process;
- the exact fallback (``CLISONIX_CPU_GEMM=exact``) on the same sweep at one shape;
- ``LowRankLinear`` on every M, its two GEMMs in one compiled call, each kind of step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clisonix_gpu as cg
from clisonix_gpu.baselines import reference_transform_matrix
from clisonix_gpu.ops import _cpu_epilogue, _dot_rows, _packed_gemm, _tiled_gemm

ACTS = cg.ACTIVATIONS
ALL_M = list(range(1, 301))
K4096_M = sorted(set(range(1, 18)) | set(range(19, 76, 2)) | {127, 128, 129, 191, 192, 193, 255, 256, 257, 299, 300})
SHAPES = [(3, 5), (129, 7), (64, 1), (30, 19), (333, 77)]
# (array kind, dtype): NumPy has no bfloat16
KINDS = [("numpy", "float32"), ("torch", "float32"), ("numpy", "float64"), ("torch", "float64"),
         ("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16")]  # fmt: skip


def _inputs(rng, kind, dtype, m, k, n):
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((n, k)) / np.sqrt(k)
    b = rng.standard_normal(n)
    if kind == "numpy":
        return x.astype(dtype), w.astype(dtype), b.astype(dtype)
    return tuple(torch.from_numpy(a).to(getattr(torch, dtype)) for a in (x, w, b))


def _bits(y):
    """Comparable raw bits (NaN payloads included) of a NumPy array or tensor."""
    if isinstance(y, torch.Tensor):
        y = y.view(torch.int16) if y.element_size() == 2 else y
        return y.numpy().view(np.uint8)
    return np.ascontiguousarray(y).view(np.uint8)


def _sweep(x, w, b, ms, activations=ACTS):
    """Each M in ``ms`` against the full call with the same activation (cycled over M)."""
    full = {a: _bits(cg.transform_matrix(x, w, b, a)) for a in activations}
    row_bytes = full[activations[0]].shape[-1]
    for m in ms:
        act = activations[m % len(activations)]
        part = _bits(cg.transform_matrix(x[:m], w, b, act))
        assert part.shape == (m, row_bytes), (m, act)
        bad = np.flatnonzero((part != full[act][:m]).any(axis=1))
        assert bad.size == 0, f"M={m} {act}: rows {bad[:5].tolist()} differ from the {x.shape[0]}-row call"


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind,dtype", KINDS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_every_batch_size_gives_the_same_rows(rng, threads, kind, dtype, k, n):
    x, w, b = _inputs(rng, kind, dtype, 300, k, n)
    _sweep(x, w, b, ALL_M)


@pytest.mark.parametrize("kind,dtype", [("numpy", "float32"), ("torch", "float32"), ("torch", "bfloat16")])
def test_k4096(rng, threads, kind, dtype):
    x, w, b = _inputs(rng, kind, dtype, 300, 4096, 33)
    _sweep(x, w, b, K4096_M)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_weight_over_8_mib(rng, threads, kind):
    """Weights of 8 MiB or more take MKL's pack made directly in NumPy's memory (the smaller ones
    torch's op): the same sweep there, with an odd K."""
    x, w, b = _inputs(rng, kind, "float32", 300, 1031, 2049)
    assert (w.nbytes if kind == "numpy" else w.numel() * 4) >= _packed_gemm._HUGE_PAGE_WEIGHT
    _sweep(x, w, b, K4096_M, activations=("gelu", None, "silu"))
    if _packed_gemm._mkl() is not None:
        assert any(isinstance(entry.pack, _packed_gemm.Pack) for entry in _packed_gemm._cache.values())


@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_every_batch_size(rng, activation):
    x, w, b = _inputs(rng, "torch", "float32", 300, 129, 7)
    _sweep(x, w, b, ALL_M, activations=(activation,))
    _sweep(x, w, None, range(1, 300, 7), activations=(activation,))


def test_thread_count_changed_mid_process(rng):
    x, w, b = _inputs(rng, "torch", "float32", 300, 333, 77)
    before = torch.get_num_threads()
    try:
        for count in (2, 1, 2, 1):
            torch.set_num_threads(count)
            _sweep(x, w, b, range(1, 301, 3), activations=("gelu", "silu"))
            assert f"{count} thread" in cg.transform_matrix_cpu_method(333, 77, "float32")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("k,n", SHAPES + [(4096, 33), (1031, 2049)])
def test_numpy_and_torch_give_the_same_bits(rng, dtype, k, n):
    x, w, b = _inputs(rng, "numpy", dtype, 150, k, n)
    for act in ("gelu", "sigmoid", None):
        ours = cg.transform_matrix(x, w, b, act)
        theirs = cg.transform_matrix(*(torch.from_numpy(a) for a in (x, w, b)), act)
        assert np.array_equal(_bits(ours), _bits(theirs)), act


def test_exact_fallback_is_batch_invariant_and_used_for_every_row(rng, monkeypatch):
    assert not cg.transform_matrix_cpu_method(129, 33).startswith("exact")  # BLAS serves this case
    monkeypatch.setenv("CLISONIX_CPU_GEMM", "exact")
    assert cg.transform_matrix_cpu_method(129, 33).startswith("exact")
    x, w, b = _inputs(rng, "numpy", "float32", 300, 129, 33)
    _sweep(x, w, b, range(1, 301, 2))
    # the exact path rounds correctly almost always: its bits are not the tiled path's
    exact = cg.transform_matrix(x, w, b)
    monkeypatch.delenv("CLISONIX_CPU_GEMM")
    tiled = cg.transform_matrix(x, w, b)
    assert not np.array_equal(exact, tiled)
    ref = reference_transform_matrix(x, w, b)
    assert np.abs(exact - ref).max() <= np.abs(tiled - ref).max()


def test_failed_checks_send_the_case_to_the_exact_path(rng, monkeypatch):
    monkeypatch.setattr(_tiled_gemm, "_check", lambda *args: False)
    monkeypatch.setattr(_tiled_gemm, "_plans", {})
    monkeypatch.setattr(_packed_gemm, "_check", lambda *args: None)
    monkeypatch.setattr(_packed_gemm, "_verdicts", {})
    monkeypatch.setattr(_dot_rows, "_check", lambda *args: False)
    monkeypatch.setattr(_dot_rows, "_verdicts", {})
    assert cg.transform_matrix_cpu_method(40, 3).startswith("exact float64 slices (BLAS failed")
    x, w, b = _inputs(rng, "torch", "float32", 20, 40, 3)
    monkeypatch.setenv("CLISONIX_CPU_GEMM", "exact")
    forced = cg.transform_matrix(x, w, b, "tanh")
    monkeypatch.delenv("CLISONIX_CPU_GEMM")
    assert torch.equal(cg.transform_matrix(x, w, b, "tanh"), forced)


def test_method_is_reported_per_case():
    text = cg.transform_matrix_cpu_method(129, 7, np.float64)
    # the row tiles where their check passes (on AMD Zen 4 MKL's dgemm fails it at this shape)
    method = "row tiles" if _tiled_gemm.plan_for(129, 7, torch.float64) else "exact float64 slices (BLAS failed the checks"
    assert "K=129, N=7, float64" in text and method in text
    # bfloat16 and float16 accumulate in float32: they share float32's case
    assert cg.transform_matrix_cpu_method(129, 7, torch.bfloat16) == cg.transform_matrix_cpu_method(129, 7, "float32")


def test_check_rejects_a_position_dependent_gemm(monkeypatch):
    """The check is not vacuous: a GEMM whose rounding depends on the row's place fails it."""
    real_mm = torch.mm

    def position_dependent(a, b, *, out):
        real_mm(a, b, out=out)
        out[-1] = torch.nextafter(out[-1], torch.full_like(out[-1], np.inf))
        return out

    monkeypatch.setattr(torch, "mm", position_dependent)
    assert not _tiled_gemm._check(_tiled_gemm.TilePlan((16, 32, 64)), 33, 5, torch.float32)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTS)
def test_epilogue_rounds_every_element_as_a_lone_simd_vector_does(rng, activation, dtype, count):
    """The epilogue on buffers of many lengths (one piece, many pieces, torch's threading
    thresholds crossed, a tail short of 64) against the activation on 64-element pieces, which
    only the SIMD code computes: whatever the buffer's length, an element's bits are the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        # 131072 and 192000 split at whole vectors under 1-3 threads (one call) or not (pieces)
        lengths = (1, 63, 64, 65, 6144, 6208, 6211, 12352, 18496, 32768, 32832, 65600, 64 * 1999 + 5, 131072, 192000, 64 * 4097, 3 * 32768 + 6208 + 7)
        for length in lengths:
            z = torch.from_numpy(rng.standard_normal(length) * 4).to(dtype)
            padded = torch.cat([z, torch.zeros(-length % 64, dtype=dtype)])
            expected = torch.cat([cg.ops.activations.TABLE[activation].torch(piece) for piece in padded.split(64)])[:length]
            flat = z.clone()
            _cpu_epilogue.apply_epilogue_(flat.view(1, -1), None, activation)
            assert torch.equal(flat, expected), (activation, length, int((flat != expected).sum()))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
def test_wide_outputs_every_batch_size(rng, threads, activation):
    """N = 1000: from M = 7 on, the output crosses torch's threading thresholds for elementwise ops."""
    x, w, b = _inputs(rng, "torch", "float32", 300, 64, 1000)
    _sweep(x, w, b, [1, 2, 7, 15, 16, 17, 33, 64, 65, 127, 200, 299, 300], activations=(activation,))


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_torch_op_and_layers_give_the_bits_of_the_top_level_op(rng, threads, dtype):
    """``cg.torch.transform_matrix`` (what the layers call) takes a shorter road to the same tiles:
    every M, every activation, the same bits as ``cg.transform_matrix``."""
    x, w, b = _inputs(rng, "torch", dtype, 300, 129, 7)
    for m in list(range(1, 40)) + [63, 64, 65, 127, 128, 129, 255, 256, 257, 300]:
        act = ACTS[m % len(ACTS)]
        expected = _bits(cg.transform_matrix(x[:m], w, b, act))
        assert np.array_equal(_bits(cg.torch.transform_matrix(x[:m], w, b, act)), expected), (m, act)
        assert np.array_equal(_bits(cg.torch.transform_matrix(x[:m].t().contiguous().t(), w, b, act)), expected), (m, act)


@pytest.mark.parametrize("k,r,n", [(129, 7, 33), (30, 2, 3), (256, 33, 40)])
def test_low_rank_layers_every_batch_size(rng, threads, k, r, n):
    """A ``LowRankLinear``'s usual call runs its two GEMMs in one compiled call (dot products then
    packed, both dot products, both packed; a rank is at most N, so dot products never follow a
    packed first GEMM): every M from 1 to 300 gives the rows of the 300-row call, which are those
    of its two GEMMs through the top-level op."""
    x, _, _ = _inputs(rng, "torch", "float32", 300, k, 1)
    layer = cg.nn.LowRankLinear(k, n, r, activation="silu")
    with torch.no_grad():
        full = _bits(layer(x))
        assert np.array_equal(full, _bits(cg.transform_matrix(cg.transform_matrix(x, layer.first), layer.second, layer.bias, "silu")))
        for m in ALL_M:
            part = _bits(layer(x[:m]))
            bad = np.flatnonzero((part != full[:m]).any(axis=1))
            assert bad.size == 0, f"M={m}: rows {bad[:5].tolist()} differ from the 300-row call"
