"""The packed-weight CPU method: its first-use check, and its cache of packed weights, which must
never serve a weight that changed (whatever wrote it) nor keep one that is gone."""

from __future__ import annotations

import gc
import mmap
import os

import numpy as np
import pytest
import torch
from packed_helpers import empty_cache, fresh, run_at_once, same  # noqa: F401 (empty_cache: an autouse fixture)

import clisonix_gpu as cg
from clisonix_gpu.ops import _dot_rows, _numba_gemm, _packed_gemm, _tiled_gemm, transform_matrix

pytestmark = pytest.mark.skipif(_packed_gemm._mkl_ops() is None, reason="this torch build has no MKL packed GEMM")

K, N = 129, 33


def test_float32_cases_take_the_packed_method_and_float64_never_does():
    assert cg.transform_matrix_cpu_method(K, N, "float32").startswith("MKL packed GEMM")
    assert cg.transform_matrix_cpu_method(K, N, "bfloat16").startswith("MKL packed GEMM")
    float64 = cg.transform_matrix_cpu_method(K, N, "float64")
    # the row tiles where their check passes (on AMD Zen 4 MKL's dgemm fails it at this shape)
    assert ("row tiles" if _tiled_gemm.plan_for(K, N, torch.float64) else "BLAS failed the checks") in float64


def test_a_weight_is_packed_once_and_reused(rng):
    x = torch.from_numpy(rng.standard_normal((20, K), dtype=np.float32))
    w = torch.randn(N, K)
    first = cg.transform_matrix(x, w, None, "gelu")
    assert _packed_gemm.cache_info()["weights"] == 1
    calls = []
    real_pack = _packed_gemm._pack
    try:
        _packed_gemm._pack = lambda *args: calls.append(args) or real_pack(*args)
        again = cg.transform_matrix(x, w, None, "gelu")
        single = cg.transform_matrix(x[7:8], w, None, "gelu")
    finally:
        _packed_gemm._pack = real_pack
    assert calls == [] and same(first, again) and same(first[7:8], single)


@pytest.mark.parametrize(
    "write",
    [
        lambda w: w.mul_(2),  # through the tensor: its version counter moves
        lambda w: w[3].add_(1),  # through a view: the same counter
        lambda w: w.data.normal_(),  # through .data: no counter, every element changes (sampled)
        lambda w: setattr(w, "data", torch.randn(N, K)),  # new memory behind the same object
    ],
    ids=["in-place", "view", "data-rewrite", "data-rebind"],
)
def test_a_changed_torch_weight_is_packed_again(rng, write):
    x = torch.from_numpy(rng.standard_normal((9, K), dtype=np.float32))
    w = torch.randn(N, K)
    cg.transform_matrix(x, w, None, "silu")
    with torch.no_grad():
        write(w)
    assert same(cg.transform_matrix(x, w, None, "silu"), fresh(x, w))


def test_a_changed_numpy_weight_is_packed_again_even_one_element(rng):
    x = rng.standard_normal((9, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    before = cg.transform_matrix(x, w, None, "silu")
    w[5, 100] += 1.0
    after = cg.transform_matrix(x, w, None, "silu")
    assert same(after, fresh(x, w)) and not same(after, before)


def test_a_tensor_over_numpy_memory_is_hashed_in_full(rng):
    """``torch.from_numpy`` shares memory that NumPy can write with no version counter moving."""
    x = torch.from_numpy(rng.standard_normal((9, K), dtype=np.float32))
    array = rng.standard_normal((N, K), dtype=np.float32)
    w = torch.from_numpy(array)
    before = cg.transform_matrix(x, w, None, "tanh")
    array[N - 1, K - 1] *= -1
    after = cg.transform_matrix(x, w, None, "tanh")
    assert same(after, fresh(x, w, activation="tanh")) and not same(after, before)


def test_an_inference_mode_weight_is_hashed(rng):
    """Inference tensors have no version counter: they are checked like NumPy memory."""
    with torch.inference_mode():
        x = torch.randn(9, K)
        w = torch.randn(N, K)
        before = cg.transform_matrix(x, w, None, "gelu")
        w[2, 3] += 1.0
        after = cg.transform_matrix(x, w, None, "gelu")
        assert same(after, fresh(x, w, activation="gelu")) and not same(after, before)
    assert same(cg.transform_matrix(x, w, None, "gelu"), after)


def test_thread_count_change_repacks_and_keeps_the_bits(rng):
    x = torch.from_numpy(rng.standard_normal((40, K), dtype=np.float32))
    w = torch.randn(N, K)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = cg.transform_matrix(x, w, None, "gelu")
        torch.set_num_threads(1)
        one = cg.transform_matrix(x[:3], w, None, "gelu")
        assert same(one, fresh(x[:3], w, activation="gelu"))
    finally:
        torch.set_num_threads(before)
    assert two.shape == (40, N)


def test_a_weight_that_dies_leaves_the_cache(rng):
    x = torch.randn(4, K)
    w = torch.randn(N, K)
    cg.transform_matrix(x, w)
    assert _packed_gemm.cache_info()["weights"] == 1
    del w
    gc.collect()
    assert _packed_gemm.cache_info() == {"weights": 0, "bytes": 0, "limit": _packed_gemm.cache_info()["limit"], "watched": 0}


def test_cache_limit_zero_packs_every_call_and_bad_settings_are_named(rng, monkeypatch):
    x = torch.randn(4, K)
    w = torch.randn(N, K)
    monkeypatch.setenv("CLISONIX_PACK_CACHE_MB", "0")
    y = cg.transform_matrix(x, w, None, "relu")
    assert _packed_gemm.cache_info()["weights"] == 0 and same(y, fresh(x, w, activation="relu"))
    monkeypatch.setenv("CLISONIX_PACK_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="CLISONIX_PACK_CACHE_MB"):
        cg.transform_matrix(x, w)
    monkeypatch.delenv("CLISONIX_PACK_CACHE_MB")
    monkeypatch.setenv("CLISONIX_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="CLISONIX_CPU_GEMM"):
        cg.transform_matrix(x, w)


def test_the_cache_evicts_the_least_recently_used_weight(monkeypatch):
    weights = [torch.randn(N, K) for _ in range(3)]
    monkeypatch.setenv("CLISONIX_PACK_CACHE_MB", str(2.5 * N * K * 4 / (1 << 20)))
    for w in weights:
        cg.transform_matrix(torch.randn(2, K), w)
    assert _packed_gemm.cache_info()["weights"] == 2


def test_inputs_are_never_modified(rng):
    x = torch.randn(30, K)
    w = torch.randn(N, K)
    b = torch.randn(N)
    copies = [t.clone() for t in (x, w, b)]
    for _ in range(2):
        cg.transform_matrix(x, w, b, "sigmoid")
    assert all(torch.equal(a, c) for a, c in zip((x, w, b), copies, strict=True))
    assert w._version == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_are_not_exported_to_numpy(dtype):
    """``Tensor.numpy()`` would mark a storage not resizable for good: the caller's tensors stay
    resizable, whether their weight is sampled or (in inference mode) hashed."""
    x, w, b = torch.randn(5, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    for _ in range(2):
        cg.transform_matrix(x, w, b, "gelu")
    with torch.inference_mode():
        wi = torch.randn(N, K, dtype=dtype)
        cg.transform_matrix(x, wi, b, "gelu")
    assert all(t.untyped_storage().resizable() for t in (x, w, b, wi))
    w.resize_(N + 1, K)  # what a non-resizable storage refuses


def _exact_product(x, pack, w):
    """A packed GEMM that rounds every row alike on any machine: float64 products, rounded once."""
    return (x.double() @ w.double().T).float()


def _bumped(out, rows):
    """``out`` with the given rows moved one float up: what a kernel that rounds differently gives."""
    out[rows] = torch.nextafter(out[rows], torch.full_like(out[rows], np.inf))
    return out


def _one_call_at_a_time(monkeypatch, compute):
    """Every packed GEMM through ``compute`` (rows -> their products, one MKL call each): the
    compiled caller, which calls MKL itself, turned off (``CLISONIX_NUMBA=0``)."""
    monkeypatch.setenv("CLISONIX_NUMBA", "0")
    monkeypatch.setattr(_packed_gemm, "packed_compute", compute)


def test_check_rejects_a_position_dependent_packed_gemm(monkeypatch):
    """The check is not vacuous: a packed GEMM whose last row rounds differently fails it, padded
    or not."""
    _one_call_at_a_time(monkeypatch, lambda x, pack, w: _bumped(_exact_product(x, pack, w), -1))
    assert _packed_gemm._check(33, 5) is None


@pytest.mark.parametrize("whole_groups,expected", [(1, 1), (4, 4), (8, 8), (16, None)])
def test_check_pads_calls_to_the_smallest_row_multiple_that_keeps_the_bits(monkeypatch, whole_groups, expected):
    """A packed GEMM that rounds calls of other than whole groups of rows differently (as MKL does
    on AMD Zen 4 for groups of four) gets its calls padded with zero rows to such a multiple (1, 4
    or 8 tried in turn); past 8, the case fails the check."""
    calls = []

    def grouped(x, pack, w):
        calls.append(x.shape[0])
        out = _exact_product(x, pack, w)
        return out if x.shape[0] % whole_groups == 0 else _bumped(out, slice(None))

    _one_call_at_a_time(monkeypatch, grouped)
    case = _packed_gemm._check(33, 5)
    assert (case and case.row_multiple) == expected
    if case is None:
        return
    x, w = torch.randn(40, 33), torch.randn(5, 33)
    for m in (1, 2, 3, 5, 7, 9, 17, 40):
        calls.clear()
        out = _packed_gemm.packed_rows(x[:m], None, w, case)
        assert calls == [-(-m // expected) * expected] and out.shape == (m, 5) and out.is_contiguous()
        assert same(out, _exact_product(x[:m], None, w))


def test_large_batches_go_in_checked_calls(rng, monkeypatch):
    """A batch larger than the check covers runs in calls of the checked size, with the same rows."""
    x = torch.randn(2500, K)
    w = torch.randn(N, K)
    full = cg.transform_matrix(x, w, None, "sigmoid")
    calls = []
    real = _packed_gemm.packed_compute
    _one_call_at_a_time(monkeypatch, lambda x, pack, w: calls.append(x.shape[0]) or real(x, pack, w))
    again = cg.transform_matrix(x, w, None, "sigmoid")
    assert calls == [1024, 1024, 452] and same(full, again)
    assert same(cg.transform_matrix(x[1000:1100], w, None, "sigmoid"), full[1000:1100])


def test_training_a_layer_repacks_after_every_step(rng):
    """An optimizer step writes the weight in place: the next forward packs the new weight."""
    layer = cg.nn.LIAMLinear(K, N, activation="gelu")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, K)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
        with torch.no_grad():
            served = layer(x)
            expected = cg.transform_matrix(x, layer.weight.detach().clone(), layer.bias.detach().clone(), "gelu")
        assert same(served, expected)


def _child_digest(w):
    return _packed_gemm._digest(w)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_hashes_large_weights(rng):
    """The hashing threads of a parent do not exist in a forked child: it must not wait for them.
    (MKL itself may hang in a child forked after the parent ran it threaded; that is torch's.)"""
    import multiprocessing

    w = rng.standard_normal((1100, 1000), dtype=np.float32)  # over the size hashed in pieces
    expected = _packed_gemm._digest(w)
    assert len(expected) == torch.get_num_threads()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_child_digest, (w,)).get(timeout=60) == expected


def test_concurrent_calls_share_the_cache_and_the_bits(rng):
    """Threads calling with the same weights (torch and NumPy) at once: every row has the bits of
    a lone call."""

    w = torch.randn(300, 200)
    wn = rng.standard_normal((300, 200), dtype=np.float32)
    x = torch.randn(64, 200)
    ref, refn = fresh(x, w, activation="gelu"), fresh(x.numpy().copy(), wn, activation="gelu")
    bad = []

    def work(seed):
        for j in range(30):
            m = 1 + (seed * 7 + j) % 64
            if not same(cg.transform_matrix(x[:m], w, None, "gelu"), ref[:m]):
                bad.append(("torch", m))
            if not same(cg.transform_matrix(x.numpy()[:m].copy(), wn, None, "gelu"), refn[:m]):
                bad.append(("numpy", m))

    run_at_once(work, range(3))
    assert bad == []


@pytest.mark.parametrize("k,n", [(30, 19), (256, 84), (129, 33), (4096, 33), (64, 1), (1, 2)])
def test_packs_made_for_any_first_batch_give_the_same_rows(rng, k, n):
    """A weight is packed for its first batch (hint 128, 256 or 1024 by its size, 128 only where
    the check allows it); the rows come out the same whichever it was, in batches of 1 row to the
    whole batch. Intel's MKL runs one row as two under hint 128 for the first three shapes; on AMD
    Zen 4 every call of these shapes runs padded to four rows."""
    x = torch.from_numpy(rng.standard_normal((1100, k), dtype=np.float32))
    values = rng.standard_normal((n, k), dtype=np.float32)
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    expected = None
    for first in (1, 300, 600, 1100):
        w = torch.tensor(values)  # a new weight object: packed for this first batch
        cg.transform_matrix(x[:first], w, b, "gelu")
        got = [cg.transform_matrix(x[:m], w, b, "gelu") for m in (1, 2, 3, 17, 40, 1100)]
        assert all(same(part, got[-1][: part.shape[0]]) for part in got), first
        if expected is None:
            expected = got
        assert all(same(a, e) for a, e in zip(got, expected)), first


def _tagging_small_packs(monkeypatch):
    """Packs made with the small hint, by id, as ``_pack`` makes them."""
    small, real = set(), _packed_gemm._pack

    def tagged(w, hint):
        pack = real(w, hint)
        if hint == _packed_gemm._SMALL_HINT:
            small.add(id(pack))
        return pack

    monkeypatch.setattr(_packed_gemm, "_pack", tagged)
    return small


@pytest.mark.parametrize("differs_at,expected", [(None, (128, False)), ({1}, (128, True)), ({1, 2}, (256, False))])
def test_check_takes_the_small_hint_only_with_the_same_bits(monkeypatch, differs_at, expected):
    """A small-hint pack whose one-row calls round differently is used with one row run as two;
    one whose two-row calls differ too is not used (the case keeps hint 256)."""
    small = _tagging_small_packs(monkeypatch)

    def compute(x, pack, w):
        out = _exact_product(x, pack, w)  # this machine's MKL may need its calls padded
        if differs_at and id(pack) in small and x.shape[0] in differs_at:
            out[0] = torch.nextafter(out[0], torch.full_like(out[0], np.inf))
        return out

    _one_call_at_a_time(monkeypatch, compute)
    case = _packed_gemm._check(33, 5)
    assert case is not None and (case.smallest_hint, case.pad_one_row) == expected


def test_one_row_runs_as_two_rows_where_the_case_says_so(rng, monkeypatch):
    x = torch.from_numpy(rng.standard_normal((1, K), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32))
    pack, calls, real = _packed_gemm._pack(w, 128), [], _packed_gemm.packed_compute
    _one_call_at_a_time(monkeypatch, lambda x, pack, w: calls.append(x.shape[0]) or real(x, pack, w))
    padded = _packed_gemm.packed_rows(x, pack, w, _packed_gemm.PackedCase(1024, 128, True))
    plain = _packed_gemm.packed_rows(x, pack, w, _packed_gemm.PackedCase(1024, 128, False))
    assert calls == [2, 1] and padded.shape == (1, N) and padded.is_contiguous()
    assert same(padded, real(torch.cat([x, torch.zeros_like(x)]), pack, w)[:1])
    assert torch.allclose(padded, plain, rtol=1e-5, atol=1e-5)


def test_layer_call_shortcut_gives_the_general_paths_bits_and_declines_the_rest(rng):
    """The shortcut serves the usual call once the weight is packed, with the general path's
    bits; a call it cannot serve (first call, grad recording, float64, a non-contiguous x, an
    unknown activation) returns None, and the general path answers it (or raises)."""
    from clisonix_gpu.ops.transform_matrix import layer_call_shortcut

    x = torch.from_numpy(rng.standard_normal((37, K), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32)).clone()
    b = torch.from_numpy(rng.standard_normal(N, dtype=np.float32))
    assert layer_call_shortcut(x, w, b, "gelu") is None  # nothing packed yet
    general = cg.transform_matrix(x, w, b, "gelu")
    assert same(layer_call_shortcut(x, w, b, "gelu"), general)
    assert same(cg.torch.transform_matrix(x, w, b, "gelu"), general)
    declined = [
        (x.requires_grad_(True), w, b, "gelu"),
        (x.detach().double(), w.double(), b.double(), "gelu"),
        (x.detach().t().contiguous().t(), w, b, "gelu"),
        (x.detach(), w, b, "swish"),
        (x.detach(), w, b, np.array(["gelu", "relu"])),
        (x.detach(), w, b[:-1], "gelu"),
    ]
    for args in declined:
        assert layer_call_shortcut(*args) is None
    with pytest.raises(ValueError, match="unknown activation"):
        cg.transform_matrix(x.detach(), w, b, "swish")
    with pytest.raises(TypeError, match="activation must be a str"):
        cg.transform_matrix(x.detach(), w, b, np.array(["gelu", "relu"]))


@pytest.mark.parametrize(
    "rebind",
    [
        lambda w: w.data.t(),  # the same memory, other strides: not contiguous
        lambda w: w.data.t().contiguous().t(),  # new memory, not contiguous
        lambda w: w.data.half(),  # float16
        lambda w: w.data.clone(),  # new memory, the same values: packed again
    ],
    ids=["transposed-view", "strided-copy", "float16", "copy"],
)
def test_a_weight_rebound_after_its_pack_is_never_served_from_its_old_entry(rng, rebind):
    """The shortcut takes a weight's dtype, layout and contiguity from its cache entry, made when
    the weight was packed; a weight whose ``.data`` was rebound since is not served from it: the
    shortcut declines, and the layer's answer is the general path's for the new weight."""
    from clisonix_gpu.ops.transform_matrix import layer_call_shortcut

    layer = cg.nn.LIAMLinear(40, 40, activation="silu")
    x = torch.from_numpy(rng.standard_normal((9, 40), dtype=np.float32))
    with torch.no_grad():
        layer(x)
        assert layer_call_shortcut(x, layer.weight, layer.bias, "silu") is not None
        layer.weight.data = rebind(layer.weight)
        assert layer_call_shortcut(x, layer.weight, layer.bias, "silu") is None
        if layer.weight.dtype != torch.float32:  # the general path's answer: the documented error
            with pytest.raises(TypeError, match="share one dtype"):
                layer(x)
            return
        assert same(layer(x), fresh(x, layer.weight.detach().clone(), layer.bias.detach(), "silu"))


def test_the_low_rank_shortcut_gives_the_two_general_calls_bits_and_declines_the_rest(rng, monkeypatch):
    """A low-rank layer's usual call (both factors packed) is its two GEMMs with the checks made
    once: the bits of the two calls through the general path, for the layer and the function; a
    call it cannot serve returns None, and the layer's answer keeps the general path's bits."""
    from clisonix_gpu.ops.transform_matrix import low_rank_call_shortcut

    layer = cg.nn.LowRankLinear(K, N, 8, activation="gelu")  # the first factor (8 rows) takes the dot products
    first, second, bias = layer.first, layer.second, layer.bias
    x = torch.from_numpy(rng.standard_normal((37, K), dtype=np.float32))
    with torch.no_grad():
        assert low_rank_call_shortcut(x, first, second, bias, "gelu") is None  # nothing packed yet
        general = cg.transform_matrix(cg.transform_matrix(x, first), second, bias, "gelu")
        assert same(low_rank_call_shortcut(x, first, second, bias, "gelu"), general)
        assert same(layer(x), general)
        for rows in (x[:1], x[5:12], x[36:]):  # batch invariance through the shortcut
            assert same(layer(rows), cg.transform_matrix(cg.transform_matrix(rows, first), second, bias, "gelu"))
        declined = [
            (x.t().contiguous().t(), first, second, bias, "gelu"),  # non-contiguous x
            (x.double(), first, second, bias, "gelu"),
            (x, first.t(), second, bias, "gelu"),  # a strided factor
            (x, first, second[:, :-1], bias, "gelu"),  # factors that do not chain
            (x, first, second, bias[:-1], "gelu"),
            (x[:0], first, second, bias, "gelu"),
            (x, first, second, bias, "swish"),
            (x.numpy(), first, second, bias, "gelu"),
        ]
        for args in declined:
            assert low_rank_call_shortcut(*args) is None
        assert same(layer(x.t().contiguous().t()), general)  # the general path: same bits
        from clisonix_gpu.ops import transform_matrix as tm

        gemms, real_rows, real_pair = [], tm._layer_rows, tm.low_rank_rows
        monkeypatch.setattr(tm, "_layer_rows", lambda *args, **kwargs: gemms.append("apart") or real_rows(*args, **kwargs))
        monkeypatch.setattr(tm, "low_rank_rows", lambda *args: gemms.append("pair") or real_pair(*args))
        assert low_rank_call_shortcut(x, first, second.detach().clone(), bias, "gelu") is None  # second not packed
        assert gemms == []  # declined before either GEMM ran
        assert same(low_rank_call_shortcut(x, first, second, bias, "gelu"), general)
        assert gemms == (["pair"] if _numba_gemm.compiled_kernels() is not None else ["apart", "apart"])
        gemms.clear()
        monkeypatch.setenv("CLISONIX_NUMBA", "0")  # no compiled pair, no dot products: two packed GEMMs
        assert low_rank_call_shortcut(x, first, second, bias, "gelu") is None or gemms == ["apart", "apart"]
        monkeypatch.delenv("CLISONIX_NUMBA")
    assert low_rank_call_shortcut(x, first, second, bias, "gelu") is None  # autograd records the factors
    recorded = layer(x)
    assert recorded.requires_grad and same(recorded.detach(), general)


def test_the_shortcut_serves_numpy_arrays_with_the_general_paths_bits(rng, tmp_path):
    """NumPy float32 arrays take the shortcut once the weight is packed, with the general path's
    bits (the shortcut switched off); whatever else returns None and the general path answers it."""
    from clisonix_gpu.ops import transform_matrix as tm

    x = rng.standard_normal((37, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    b = rng.standard_normal(N, dtype=np.float32)
    assert tm.numpy_call_shortcut(x, w, b, "silu") is None  # nothing packed yet
    first = cg.transform_matrix(x, w, b, "silu")
    served = tm.numpy_call_shortcut(x, w, b, "silu")
    assert isinstance(served, np.ndarray) and served.dtype == np.float32 and same(served, first)
    assert same(tm.numpy_call_shortcut(x[5:6], w, None, None), cg.transform_matrix(x[5:6], w.copy()))
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mapped[:] = x
    declined = [
        (x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), "silu"),
        (np.asfortranarray(x), w, b, "silu"),  # not C-contiguous
        (x[:, :-1], w[:, :-1], b, "silu"),  # strided views, K disagrees with nothing: still declined
        (x, w, b[::-1], "silu"),
        (x, torch.from_numpy(w), b, "silu"),  # mixed types: the general path names them
        (mapped, w, b, "silu"),  # a NumPy subclass
        (x[:0], w, b, "silu"),
        (x, w, b, "swish"),
    ]
    for args in declined:
        assert tm.numpy_call_shortcut(*args) is None
    assert same(cg.transform_matrix(mapped, w, b, "silu"), first)
    with cg.use_backend("numpy"):
        assert same(tm.numpy_call_shortcut(x, w, b, "silu"), first)
    with pytest.raises(TypeError):
        cg.transform_matrix(x, torch.from_numpy(w), b, "silu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):  # the torch entry point takes tensors only
        cg.torch.transform_matrix(x, w, b, "silu")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_packs_of_small_weights_cost_only_the_pages_mkl_writes():
    """MKL's pack size includes about 7.5 MB it never touches for a small weight: in huge pages
    every such pack would cost 2 MB of memory, in 4 KiB pages under 0.1 MB. A large weight's pack
    is made directly in NumPy's memory (huge pages where the kernel gives them), with the bits of
    torch's op."""
    weights = [torch.randn(19, 30) for _ in range(40)]
    before = _resident_bytes()
    packs = [_packed_gemm._pack(w, 128) for w in weights]
    grown = _resident_bytes() - before
    assert grown < 20 << 20, f"40 packs of 2 KB weights took {grown / 2**20:.1f} MB"
    assert len(packs) == 40
    big = torch.randn(2048, 1100)  # over 8 MiB
    pack = _packed_gemm._pack(big, 256)
    x = torch.randn(3, 1100)
    if _packed_gemm._mkl() is not None:
        assert isinstance(pack, _packed_gemm.Pack) and pack.address % 64 == 0
        by_op = _packed_gemm._mkl_ops()[0](big, 256)
        assert same(_packed_gemm.packed_compute(x, pack, big), _packed_gemm.packed_compute(x, by_op, big))
    assert torch.allclose(_packed_gemm.packed_compute(x, pack, big), x @ big.T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype,k,n", [(np.float32, 41, 23), (np.float64, 43, 29), (np.float32, 1100, 2049)])
def test_a_torch_device_context_changes_nothing(rng, dtype, k, n):
    """``with torch.device("meta")`` makes torch's factories build tensors on that device: every
    buffer of the CPU path (packs, outputs, the first-use check's rows) is made on the CPU all the
    same, so NumPy and CPU tensor calls, first ones included, give the same bits as without it.
    Cases no other test meets (checked here); the last one's weight is large enough for the pack
    made directly (_pack)."""
    x = rng.standard_normal((1200, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    with torch.device("meta"):
        inside = cg.transform_matrix(x, w, None, "gelu")
        inside_torch = cg.transform_matrix(torch.from_numpy(x).clone(), torch.from_numpy(w).clone(), None, "gelu")
    assert inside_torch.device.type == "cpu"
    assert same(inside, cg.transform_matrix(x, w.copy(), None, "gelu")) and same(inside_torch, inside)


def test_negative_views_are_read_as_their_values(rng):
    """``z.conj().imag`` is a float tensor whose memory holds the values unnegated (its negative bit
    says so): every method, which reads memory, must see the values."""
    z = torch.randn(9, 1, 40, dtype=torch.complex64)
    w = z.conj().imag[:, 0]  # (9, 40), negative bit set, strided
    x = torch.randn(5, 1, 40, dtype=torch.complex64).conj().imag[:, 0]
    one = torch.randn(1, 1, dtype=torch.complex64).conj().imag  # (1, 1): negative and contiguous
    assert w.is_neg() and x.is_neg() and one.is_neg() and one.is_contiguous()
    for xx, ww in ((x, w), (x.resolve_neg(), w), (one, torch.randn(3, 1)), (one, one)):
        for _ in range(2):  # the second call would find a cached pack
            got = cg.transform_matrix(xx, ww, None, "relu")
            assert same(got, cg.transform_matrix(xx.resolve_neg().clone(), ww.resolve_neg().clone(), None, "relu"))
            assert torch.allclose(got, torch.relu(xx.resolve_neg() @ ww.resolve_neg().T), atol=1e-5)
    with torch.no_grad():
        layer = cg.nn.LIAMLinear(1, 3)
        assert torch.allclose(layer(one), torch.nn.functional.linear(one.resolve_neg(), layer.weight, layer.bias), atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 113, 114, 115])
def test_the_compiled_caller_gives_the_bits_of_one_padded_call(rng, monkeypatch, m):
    """The compiled caller runs the rows that fill whole row multiples in place and the rest as one
    padded call, adding the bias itself: the bits of one padded call of the whole batch plus
    torch's addition (``CLISONIX_NUMBA=0``). With ``padded``, the products of the added rows stay
    below the batch's rows."""
    k, n = 129, 33
    case = _packed_gemm.packed_ok(k, n, torch.float32)
    if case is None:
        pytest.skip("this machine's MKL fails the packed check at this shape")
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    pack = _packed_gemm._pack(w, 128)
    compiled = _packed_gemm.packed_rows(x, pack, w, case, bias=b)
    kept = _packed_gemm.packed_rows(x, pack, w, case, bias=b, padded=True)
    monkeypatch.setenv("CLISONIX_NUMBA", "0")
    one_call = _packed_gemm.packed_rows(x, pack, w, case, bias=b)
    assert compiled.shape == (m, n) and same(compiled, one_call)
    assert kept.shape == (case.rows_to_run(m), n) and same(kept[:m], one_call)
    assert same(_packed_gemm.packed_rows(x, pack, w, case, bias=b, padded=True), kept)


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("m", [1, 4, 7, 116])
def test_no_route_gives_a_negative_zero(rng, monkeypatch, m, k):
    """Every packed route adds the products to a zeroed output: a product row that sums to zero
    (a zero row of x; a weight row of negative values, whose products with it are all -0) comes
    out +0 from the compiled caller, the ctypes call and torch's op alike, whatever kernel MKL
    picks for the batch size (MKL's overwrite gives -0 from some of them)."""
    n = 19
    case = _packed_gemm.packed_ok(k, n, torch.float32)
    if case is None:
        pytest.skip("this machine's MKL fails the packed check at this shape")
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    x[m // 2] = 0.0
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
    w[0] = -w[0].abs()
    routes = [_packed_gemm.packed_rows(x, _packed_gemm._pack(w, 128), w, case)]
    if _packed_gemm._mkl_ops() is not None:
        routes.append(_packed_gemm.packed_rows(x, _packed_gemm._mkl_ops()[0](w, 128), w, case))
    monkeypatch.setenv("CLISONIX_NUMBA", "0")
    routes.append(_packed_gemm.packed_rows(x, _packed_gemm._pack(w, 128), w, case))
    for out in routes:
        assert not torch.signbit(out[m // 2]).any() and same(out, routes[0])
        assert torch.allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)


def _ready_pair(first: torch.Tensor, second: torch.Tensor, rows: torch.Tensor) -> tuple[object, object, object]:
    """(kernels, first's ready answer, second's) for a low-rank layer's factors, after a first call
    on ``rows`` (each case's check, the packs); skips where a piece is missing here."""
    kernels = _numba_gemm.compiled_kernels()
    if kernels is None:
        pytest.skip("the compiled kernels do not run here")
    cg.transform_matrix(cg.transform_matrix(rows, first), second)
    settings = _packed_gemm.call_settings()
    first_ready, second_ready = (transform_matrix._ready_gemm(w, settings, kernels) for w in (first, second))
    if first_ready is None or second_ready is None:
        pytest.skip("a method this test needs does not serve these shapes here")
    return kernels, first_ready, second_ready


@pytest.mark.parametrize("m", [1, 2, 5, 114, 116])
@pytest.mark.parametrize("k,r,n", [(256, 66, 40), (256, 4, 40), (30, 19, 7), (129, 1, 2)])
def test_a_low_rank_pair_in_one_call_gives_the_two_calls_bits(rng, m, k, r, n):
    """The compiled pair of a low-rank layer's GEMMs, each packed or dot products (N <= 15), the
    hidden rows kept with their padding, gives the bits of the two GEMMs run apart, with bias."""
    x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
    first = torch.from_numpy(rng.standard_normal((r, k), dtype=np.float32))
    second = torch.from_numpy(rng.standard_normal((n, r), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    kernels, first_ready, second_ready = _ready_pair(first, second, x)
    pair = _packed_gemm.low_rank_rows(x, first, first_ready, second, second_ready, b, kernels)
    apart = transform_matrix._layer_rows(transform_matrix._layer_rows(x, first, first_ready), second, second_ready, b)
    assert pair.shape == (m, n) and pair.is_contiguous() and same(pair, apart)
    assert same(pair, cg.transform_matrix(cg.transform_matrix(x, first, None), second, b))
    strided_bias = torch.empty(2 * n)[::2]
    strided_bias.copy_(b)
    assert same(_packed_gemm.low_rank_rows(x, first, first_ready, second, second_ready, strided_bias, kernels), apart)


def test_the_pair_declines_what_runs_apart(rng):
    """One-row packed weights, batches over a packed call's rows and dot products large enough to
    split over threads run apart."""
    x = torch.from_numpy(rng.standard_normal((1100, 256), dtype=np.float32))
    first = torch.from_numpy(rng.standard_normal((66, 256), dtype=np.float32))
    second = torch.from_numpy(rng.standard_normal((40, 66), dtype=np.float32))
    kernels, first_ready, second_ready = _ready_pair(first, second, x[:8])
    case = first_ready[0]
    assert _packed_gemm.low_rank_rows(x[: case.call_rows + 1], first, first_ready, second, second_ready, None, kernels) is None
    assert _packed_gemm.low_rank_rows(x[:8], first[:1], first_ready, second[:, :1], second_ready, None, kernels) is None
    narrow = torch.from_numpy(rng.standard_normal((2, 256), dtype=np.float32))
    tiny = torch.from_numpy(rng.standard_normal((3, 2), dtype=np.float32))
    kernels, narrow_ready, tiny_ready = _ready_pair(narrow, tiny, x[:8])
    assert narrow_ready == tiny_ready == _dot_rows.DOT_ROWS
    assert x.numel() * 2 < _dot_rows.SPLIT_MACS <= 9000 * 256 * 2
    wide = torch.from_numpy(rng.standard_normal((9000, 256), dtype=np.float32))
    assert _packed_gemm.low_rank_rows(wide, narrow, narrow_ready, tiny, tiny_ready, None, kernels) is None
    assert _packed_gemm.low_rank_rows(x, narrow, narrow_ready, tiny, tiny_ready, None, kernels) is not None
