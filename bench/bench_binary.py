"""Binary algebra against its peers (clisonix_gpu.baselines), same inputs, same run.

binary_matmul at an inference shape (M = 16, K = N = 8192 bits) and two square ones; Hamming top-k
of 1k queries against 100k 256-bit codes on CPU (k = 10 and k = 1000) and of 100 queries against
10M codes (10k against 1M on GPU); Hamming radius against NumPy. Effective bandwidth counts the
packed inputs read and the int32 output written once.

Exactness is checked in the same run against references computed apart from the timed code: a
float64 GEMM on +-1 for binary_matmul; for the searches our NumPy path (``CLISONIX_NUMBA=0``, a
separate implementation: BLAS or bitwise_count blocks and a key sort), indices and tie order
included. A peer's error compares its distances (its tie order may differ).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from timing import DEVICE, SIZES, Result, measure, record

import clisonix_gpu as cg
from clisonix_gpu.baselines import BINARY_MATMUL_PEERS, HAMMING_RADIUS_PEERS, HAMMING_TOPK_PEERS

KINDS = ["torch-cuda"] + (["cupy"] if cg.backends()[2].usable else []) if DEVICE == "cuda" else ["numpy", "torch-cpu"]
# (M, N, bits, in --quick)
MATMUL_CASES = {
    "cpu": [(16, 8192, 8192, True), (1024, 1024, 8192, False), (256, 256, 8192, True)],
    "cuda": [(16, 8192, 8192, True), (8192, 8192, 8192, False)],
    "tiny": [(5, 33, 136, True)],
}
# (queries, database, bits, k, in --quick)
TOPK_CASES = {
    "cpu": [
        (1000, 100_000, 256, 10, False),
        (100, 100_000, 256, 10, True),
        (1000, 100_000, 256, 1000, False),
        (100, 10_000_000, 256, 10, False),  # 320 MB of codes: searched in bounded blocks
    ],
    "cuda": [(10_000, 1_000_000, 256, 10, False), (1000, 1_000_000, 256, 10, True), (1000, 1_000_000, 256, 4096, True)],
    "tiny": [(7, 300, 64, 5, True)],
}
# (queries, database, bits, radius, in --quick): radius 96 of 256 bits finds a few codes per query
RADIUS_CASES = {"cpu": [(1000, 100_000, 256, 96, True)], "cuda": [], "tiny": [(7, 300, 64, 24, True)]}
_REFERENCES: dict[tuple[object, ...], object] = {}
# peers that hold every distance (and an int64 index each) at once: 100 x 10M codes would take 12 GB
WHOLE_MATRIX_PEERS, WHOLE_MATRIX_LIMIT = {"numpy bitwise_count + argpartition"}, 10**8


def matmul_case(m, n, bits, kind):
    return f"binary_matmul {m}x{n}x{bits}bit ({kind})"


def topk_case(nq, ndb, bits, k, kind):
    return f"hamming_topk {nq}x{ndb}x{bits}bit k={k} ({kind})"


def popcount_work(m, n, bits, out_bytes):
    """(ceiling, 32-bit popcounts, bytes): every pair's words counted once, packed inputs read once."""
    return "popc_Tops", m * n * -(-bits // 32), (m + n) * bits / 8 + out_bytes


def gpu_targets():
    """(case, ceiling, ops, bytes) of every CUDA case: the roofline's inputs, without a GPU."""
    for kind in ("torch-cuda", "cupy"):
        for m, n, bits, _ in MATMUL_CASES["cuda"]:
            yield (matmul_case(m, n, bits, kind), *popcount_work(m, n, bits, 4.0 * m * n))
        for nq, ndb, bits, k, _ in TOPK_CASES["cuda"]:
            yield (topk_case(nq, ndb, bits, k, kind), *popcount_work(nq, ndb, bits, 12.0 * nq * k))


def _codes(rng, rows, bits, kind):
    packed = rng.integers(0, 256, (rows, bits // 8), dtype=np.uint8)
    if kind == "numpy":
        return packed
    if kind == "cupy":
        import cupy

        return cupy.asarray(packed)
    return torch.from_numpy(packed).to(DEVICE)


def _host(a):
    if isinstance(a, np.ndarray):
        return a
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else a.get()


def _peer_kind(kind):
    return "torch-cuda" if kind == "cupy" else kind


def _call(impl, kind, ours, peers, *arrays):
    """The zero-argument call to time: our op on the arrays, or the peer on torch views of them."""
    if impl == "clisonix":
        return lambda: ours(*arrays)
    if kind == "cupy":
        arrays = tuple(torch.from_dlpack(a) for a in arrays[:2]) + arrays[2:]
    return peers[_peer_kind(kind)][impl](*arrays)


def _numpy_path_reference(case, op, *args):
    """``op(*args)`` on host arrays through the NumPy path, computed once per case."""
    if case not in _REFERENCES:
        saved = os.environ.get("CLISONIX_NUMBA")
        os.environ["CLISONIX_NUMBA"] = "0"
        try:
            _REFERENCES[case] = tuple(np.asarray(x) for x in op(*(a if isinstance(a, int) else _host(a) for a in args)))
        finally:
            if saved is None:
                del os.environ["CLISONIX_NUMBA"]
            else:
                os.environ["CLISONIX_NUMBA"] = saved
    return _REFERENCES[case]


def _matmul_params():
    for m, n, bits, in_quick in MATMUL_CASES[SIZES]:
        for kind in KINDS:
            for impl in ["clisonix", *BINARY_MATMUL_PEERS[_peer_kind(kind)]]:
                yield pytest.param(m, n, bits, kind, impl, in_quick, id=f"{m}x{n}x{bits}-{kind}-{impl}")


def _search_params(cases, peer_table, label):
    for nq, ndb, bits, param, in_quick in cases[SIZES]:
        for kind in KINDS:
            peers = peer_table.get(_peer_kind(kind), {})
            if not peers:
                continue
            for impl in ["clisonix", *peers]:
                if impl in WHOLE_MATRIX_PEERS and nq * ndb > WHOLE_MATRIX_LIMIT:
                    continue
                yield pytest.param(nq, ndb, bits, param, kind, impl, in_quick, id=f"{nq}x{ndb}x{bits}-{label}{param}-{kind}-{impl}")


@pytest.mark.parametrize("m,n,bits,kind,impl,in_quick", list(_matmul_params()))
def bench_binary_matmul(benchmark, quick, m, n, bits, kind, impl, in_quick):
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(0)
    a, b = _codes(rng, m, bits, kind), _codes(rng, n, bits, kind)
    fn = _call(impl, kind, cg.binary_matmul, BINARY_MATMUL_PEERS, a, b, bits)
    key = ("matmul", m, n, bits)
    if key not in _REFERENCES:  # the exact +-1 product, in float64
        signs = [np.unpackbits(_host(x), axis=-1, bitorder="little").astype(np.float64) * 2 - 1 for x in (a, b)]
        _REFERENCES[key] = signs[0] @ signs[1].T
    ref = _REFERENCES[key]
    got = np.asarray(_host(fn()), dtype=np.float64)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1))
    if impl == "clisonix":
        assert err == 0.0, f"binary_matmul is not exact: {err}"
    case = matmul_case(m, n, bits, kind)
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=3 if quick else 5)
    ceiling, ops, nbytes = popcount_work(m, n, bits, 4.0 * m * n)
    record(Result(case, impl, DEVICE, seconds, err, bytes=nbytes, ceiling=ceiling, ops=ops))


@pytest.mark.parametrize("nq,ndb,bits,k,kind,impl,in_quick", list(_search_params(TOPK_CASES, HAMMING_TOPK_PEERS, "k")))
def bench_hamming_topk(benchmark, quick, nq, ndb, bits, k, kind, impl, in_quick):
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(1)
    q, db = _codes(rng, nq, bits, kind), _codes(rng, ndb, bits, kind)
    fn = _call(impl, kind, cg.hamming_topk, HAMMING_TOPK_PEERS, q, db, k)
    ref_dist, ref_idx = _numpy_path_reference(("topk", nq, ndb, bits, k), cg.hamming_topk, q, db, k)
    dist, idx = (np.asarray(_host(x)) for x in fn())
    if impl == "clisonix":  # exact: distances, indices and the order of ties
        assert np.array_equal(dist, ref_dist) and np.array_equal(idx, ref_idx), "hamming_topk differs from the NumPy path"
    dist = np.sort(np.asarray(dist, dtype=np.float64), axis=1)
    err = float(np.abs(dist - ref_dist).max() / max(np.abs(ref_dist).max(), 1))
    case = topk_case(nq, ndb, bits, k, kind)
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=2 if quick else 3)
    ceiling, ops, nbytes = popcount_work(nq, ndb, bits, 12.0 * nq * k)  # int32 distance + int64 index out
    record(Result(case, impl, DEVICE, seconds, err, bytes=nbytes, ceiling=ceiling, ops=ops))


@pytest.mark.parametrize("nq,ndb,bits,r,kind,impl,in_quick", list(_search_params(RADIUS_CASES, HAMMING_RADIUS_PEERS, "r")))
def bench_hamming_radius(benchmark, quick, nq, ndb, bits, r, kind, impl, in_quick):
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(2)
    q, db = _codes(rng, nq, bits, kind), _codes(rng, ndb, bits, kind)
    fn = _call(impl, kind, cg.hamming_radius, HAMMING_RADIUS_PEERS, q, db, r)
    ref = _numpy_path_reference(("radius", nq, ndb, bits, r), cg.hamming_radius, q, db, r)
    got = [np.asarray(_host(x)) for x in fn()]
    exact = all(np.array_equal(g, e) for g, e in zip(got, ref))
    if impl == "clisonix":
        assert exact, "hamming_radius differs from the NumPy path"
    case = f"hamming_radius {nq}x{ndb}x{bits}bit r={r} ({kind})"
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=2 if quick else 3)
    record(Result(case, impl, DEVICE, seconds, 0.0 if exact else 1.0, bytes=(nq + ndb) * bits / 8))
