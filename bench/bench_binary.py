"""Binary algebra against its peers (clisonix_gpu.baselines), same inputs, same run.

binary_matmul at an inference shape (M = 16, K = N = 8192 bits) and a square one; Hamming top-k of
1k queries against 100k 256-bit codes on CPU (10k against 1M on GPU). Effective bandwidth counts
the packed inputs read and the int32 output written once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timing import DEVICE, SIZES, Result, measure, record

import clisonix_gpu as cg
from clisonix_gpu.baselines import BINARY_MATMUL_PEERS, HAMMING_TOPK_PEERS

KINDS = ["torch-cuda"] + (["cupy"] if cg.backends()[2].usable else []) if DEVICE == "cuda" else ["numpy", "torch-cpu"]
# (M, N, bits, in --quick)
MATMUL_CASES = {
    "cpu": [(16, 8192, 8192, True), (1024, 1024, 8192, False), (256, 256, 8192, True)],
    "cuda": [(16, 8192, 8192, True), (8192, 8192, 8192, False)],
    "tiny": [(5, 33, 136, True)],
}
# (queries, database, bits, k, in --quick)
TOPK_CASES = {
    "cpu": [(1000, 100_000, 256, 10, False), (100, 100_000, 256, 10, True)],
    "cuda": [(10_000, 1_000_000, 256, 10, False), (1000, 1_000_000, 256, 10, True), (1000, 1_000_000, 256, 4096, True)],
    "tiny": [(7, 300, 64, 5, True)],
}


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


def _matmul_params():
    for m, n, bits, in_quick in MATMUL_CASES[SIZES]:
        for kind in KINDS:
            for impl in ["clisonix", *BINARY_MATMUL_PEERS[_peer_kind(kind)]]:
                yield pytest.param(m, n, bits, kind, impl, in_quick, id=f"{m}x{n}x{bits}-{kind}-{impl}")


def _topk_params():
    for nq, ndb, bits, k, in_quick in TOPK_CASES[SIZES]:
        for kind in KINDS:
            peers = HAMMING_TOPK_PEERS.get(_peer_kind(kind), {})
            if not peers:
                continue
            for impl in ["clisonix", *peers]:
                yield pytest.param(nq, ndb, bits, k, kind, impl, in_quick, id=f"{nq}x{ndb}x{bits}-k{k}-{kind}-{impl}")


@pytest.mark.parametrize("m,n,bits,kind,impl,in_quick", list(_matmul_params()))
def bench_binary_matmul(benchmark, quick, m, n, bits, kind, impl, in_quick):
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(0)
    a, b = _codes(rng, m, bits, kind), _codes(rng, n, bits, kind)
    fn = _call(impl, kind, cg.binary_matmul, BINARY_MATMUL_PEERS, a, b, bits)
    ref = cg.binary_matmul(_host(a), _host(b), bits).astype(np.float64)
    got = np.asarray(_host(fn()), dtype=np.float64)
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1))
    case = matmul_case(m, n, bits, kind)
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=3 if quick else 5)
    ceiling, ops, nbytes = popcount_work(m, n, bits, 4.0 * m * n)
    record(Result(case, impl, DEVICE, seconds, err, bytes=nbytes, ceiling=ceiling, ops=ops))


@pytest.mark.parametrize("nq,ndb,bits,k,kind,impl,in_quick", list(_topk_params()))
def bench_hamming_topk(benchmark, quick, nq, ndb, bits, k, kind, impl, in_quick):
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(1)
    q, db = _codes(rng, nq, bits, kind), _codes(rng, ndb, bits, kind)
    fn = _call(impl, kind, cg.hamming_topk, HAMMING_TOPK_PEERS, q, db, k)
    dist = np.asarray(_host(fn()[0]), dtype=np.float64)
    # accuracy: the k distances must equal ours, which the tests check against brute force
    ours = cg.hamming_topk(q, db, k)[0]
    ref = np.asarray(_host(ours), dtype=np.float64)
    err = float(np.abs(np.sort(dist, axis=1) - ref).max() / max(np.abs(ref).max(), 1))
    case = topk_case(nq, ndb, bits, k, kind)
    benchmark.group = case
    seconds = measure(benchmark, fn, DEVICE, rounds=2 if quick else 3)
    ceiling, ops, nbytes = popcount_work(nq, ndb, bits, 12.0 * nq * k)  # int32 distance + int64 index out
    record(Result(case, impl, DEVICE, seconds, err, bytes=nbytes, ceiling=ceiling, ops=ops))
