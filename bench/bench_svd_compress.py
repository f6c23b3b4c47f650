"""svd_compress against torch.svd_lowrank, sklearn's randomized_svd and exact SVD (clisonix_gpu.baselines).

Inputs have a known spectrum (sigma_j = 0.9^j + 1e-3 noise floor), so every method's error is
reported as achieved ||A - A_k||_F over the optimal rank-k error sqrt(sum_{j>k} sigma_j^2): 1.00
is the best possible. Same sketch size q = k + oversample and power iterations for every method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timing import DEVICE, SIZES, Result, measure_alternating, record

import clisonix_gpu as cg
from clisonix_gpu.baselines import SVD_COMPRESS_PEERS

KINDS = ["torch-cuda"] if DEVICE == "cuda" else ["numpy", "torch-cpu"]
OVERSAMPLE, POWER_ITERS = 10, 2
CASES = {  # (batch, M, N, k, in --quick)
    "cpu": [(1, 2048, 2048, 32, False), (1, 1024, 1024, 32, True), (1024, 64, 64, 8, False), (256, 64, 64, 8, True)],
    "cuda": [(1, 8192, 8192, 64, True), (1, 2048, 2048, 32, True), (1024, 64, 64, 8, True)],
    "tiny": [(1, 40, 30, 4, True)],
}


def case_name(batch, m, n, k, kind):
    return f"svd_compress {batch}x{m}x{n} k={k} float32 ({kind}; error = achieved/optimal)"


def gpu_work(batch, m, n, k):
    """(ceiling, flops, bytes) of the range finder and the reconstruction: the sketch, two products
    per power iteration and the projection each cost 2*M*N*(k + oversample) and read A once; the
    reconstruction costs 2*M*N*k and writes an M x N result (the small QRs and SVD are left out)."""
    samples, passes = k + OVERSAMPLE, 2 + 2 * POWER_ITERS
    return "fp32_matmul_TFLOPs", batch * (2.0 * m * n * samples * passes + 2.0 * m * n * k), batch * 4.0 * m * n * (passes + 1)


def gpu_targets():
    """(case, ceiling, ops, bytes) of every CUDA case: the roofline's inputs, without a GPU."""
    for batch, m, n, k, _ in CASES["cuda"]:
        yield (case_name(batch, m, n, k, "torch-cuda"), *gpu_work(batch, m, n, k))


def _test_matrix(batch, m, n, device):
    """(batch, M, N) float32 with singular values 0.9^j + 1e-3, and the optimal tail for each k."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(batch, m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(batch, n, r, generator=g, dtype=torch.float64)).Q
    sigma = 0.9 ** torch.arange(r, dtype=torch.float64) + 1e-3
    a = (u * sigma) @ v.transpose(-1, -2)
    return a.to(device, torch.float32), sigma.numpy()


_MATRICES: dict = {}


def _params():
    for batch, m, n, k, in_quick in CASES[SIZES]:
        for kind in KINDS:
            yield pytest.param(batch, m, n, k, kind, in_quick, id=f"{batch}x{m}x{n}-k{k}-{kind}")


@pytest.mark.parametrize("batch,m,n,k,kind,in_quick", list(_params()))
def bench_svd_compress(quick, batch, m, n, k, kind, in_quick):
    """Ours and every peer on the same matrix, timed in alternating blocks."""
    if quick and not in_quick:
        pytest.skip("not in --quick")
    if (batch, m, n) not in _MATRICES:
        _MATRICES.clear()
        _MATRICES[(batch, m, n)] = _test_matrix(batch, m, n, DEVICE)
    a, sigma = _MATRICES[(batch, m, n)]
    x = a.cpu().numpy() if kind == "numpy" else a
    x = x[0] if batch == 1 else x
    calls = {"clisonix": lambda: cg.svd_compress(x, k=k, oversample=OVERSAMPLE, power_iters=POWER_ITERS).reconstruct()}
    for impl, make in SVD_COMPRESS_PEERS[kind].items():
        if "exact" in impl and batch == 1 and m > 4096:
            continue  # exact SVD of 8192^2 takes longer than the whole GPU check may
        calls[impl] = make(x, k, OVERSAMPLE, POWER_ITERS)
    exact = a.double().cpu().numpy()
    optimal = np.sqrt(np.sum(sigma[k:] ** 2))
    ratios = {}
    for impl, fn in calls.items():
        approx = fn()
        approx = approx.double().cpu().numpy() if isinstance(approx, torch.Tensor) else approx.astype(np.float64)
        achieved = np.sqrt(((exact.reshape(approx.shape) - approx) ** 2).reshape(batch, -1).sum(-1))
        ratios[impl] = float(np.max(achieved / optimal))
    seconds = measure_alternating(calls, DEVICE, rounds=2 if quick or batch > 1 else 3)
    ceiling, ops, nbytes = gpu_work(batch, m, n, k)
    case = case_name(batch, m, n, k, kind)
    for impl in calls:
        record(Result(case, impl, DEVICE, seconds[impl], ratios[impl], ceiling=ceiling, ops=ops, bytes=nbytes))
