"""transform_matrix against its peers (clisonix_gpu.baselines), same inputs, same run.

CPU: NumPy arrays against NumPy ``x @ w.T + b`` + activation; torch CPU tensors against torch eager.
CUDA: torch CUDA tensors against torch eager and torch.compile, with cuBLAS matmul alone as the
ceiling (it skips the epilogue, so it is reported but never counted as the peer).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from timing import DEVICE, SIZES, Result, measure_alternating, record

import clisonix_gpu as cg
from clisonix_gpu._roofline import matmul_ceiling
from clisonix_gpu.baselines import TRANSFORM_MATRIX_PEERS, reference_transform_matrix

CASES = {  # (M, K, N, activation, in --quick)
    "cpu": [
        (4096, 1024, 1024, "relu", False),
        (1024, 1024, 1024, "relu", True),
        (16, 4096, 4096, "gelu", True),
        (512, 784, 256, "silu", False),
        (1, 4096, 4096, "gelu", True),  # serving: one request
        (64, 4096, 4096, "gelu", True),  # serving: a batch of requests
    ],
    "cuda": [
        (8192, 4096, 4096, "gelu", False),
        (4096, 4096, 4096, "relu", True),
        (16, 8192, 8192, "silu", True),
        (32768, 1024, 1024, "gelu_tanh", False),
    ],
    "tiny": [(33, 17, 9, "gelu", True)],
}
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CEILING = "ceiling: cuBLAS matmul alone"
# LIAMLinear forward + backward against nn.Linear + the same activation: (M, K, N, activation, in --quick)
LAYER_CASES = {"cpu": [(512, 1024, 1024, "gelu", True)], "cuda": [(4096, 4096, 4096, "gelu", True)], "tiny": [(33, 17, 9, "gelu", True)]}


def case_name(m, k, n, dtype_name, activation, kind):
    return f"transform_matrix {m}x{k}x{n} {dtype_name} {activation} ({kind})"


def gpu_work(m, k, n, dtype_name):
    """(compute ceiling, flops, bytes): x and w read, bias read, the output written once."""
    size = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    return matmul_ceiling(dtype_name), 2.0 * m * n * k, size * (m * k + n * k + n + m * n)


def gpu_targets():
    """(case, ceiling, ops, bytes) of every CUDA case: the roofline's inputs, without a GPU."""
    for m, k, n, act, _ in CASES["cuda"]:
        for dtype in GPU_DTYPES:
            dt = str(dtype).removeprefix("torch.")
            yield (case_name(m, k, n, dt, act, "torch-cuda"), *gpu_work(m, k, n, dt))


def _ours(x, w, b, activation):
    return cg.transform_matrix(x, w, b, activation=activation)


def _ceiling(x, w, b, activation):
    return x @ w.T


def _cases():
    if DEVICE == "cuda":
        grid = [(m, k, n, a, q, "torch-cuda", d) for m, k, n, a, q in CASES[SIZES] for d in GPU_DTYPES]
    else:
        grid = [(m, k, n, a, q, kind, torch.float32) for m, k, n, a, q in CASES[SIZES] for kind in ("numpy", "torch-cpu")]
    for m, k, n, act, in_quick, kind, dtype in grid:
        dt = str(dtype).removeprefix("torch.")
        yield pytest.param(m, k, n, act, kind, dtype, in_quick, id=f"{m}x{k}x{n}-{act}-{kind}-{dt}")


@pytest.mark.parametrize("m,k,n,activation,kind,dtype,in_quick", list(_cases()))
def bench_transform_matrix(quick, m, k, n, activation, kind, dtype, in_quick):
    """Ours and every peer on the same inputs, timed in alternating blocks."""
    if quick and not in_quick:
        pytest.skip("not in --quick")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) / np.float32(np.sqrt(k))
    b = rng.standard_normal(n, dtype=np.float32)
    if kind != "numpy":
        # tensors in torch's own memory, as a model's are (not views of NumPy's: see README, packed weights)
        x, w, b = (torch.tensor(a, device=DEVICE, dtype=dtype) for a in (x, w, b))
    dt = str(dtype).removeprefix("torch.")
    case = case_name(m, k, n, dt, activation, kind)
    impls = {"clisonix": _ours, **TRANSFORM_MATRIX_PEERS[kind]}
    if kind == "torch-cuda":
        impls[CEILING] = _ceiling
    ref = reference_transform_matrix(x, w, b, activation)
    errors = {}
    for impl, fn in impls.items():
        y = fn(x, w, b, activation)
        got = y.detach().double().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float64)
        errors[impl] = float("nan") if impl == CEILING else float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))
    calls = {impl: functools.partial(fn, x, w, b, activation) for impl, fn in impls.items()}
    seconds = measure_alternating(calls, DEVICE, rounds=3 if quick else 7)
    ceiling, ops, nbytes = gpu_work(m, k, n, dt)
    for impl in impls:
        record(Result(case, impl, DEVICE, seconds[impl], errors[impl], flops=ops, bytes=nbytes, ceiling=ceiling, ops=ops))


def _layer_step(layer, x, activation):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y = layer(x) if activation is None else activation(layer(x))
        y.sum().backward()
        return y

    return step


@pytest.mark.parametrize("m,k,n,activation,in_quick", LAYER_CASES[SIZES])
def bench_liam_linear(quick, m, k, n, activation, in_quick):
    """A training step of LIAMLinear against nn.Linear + the activation, in alternating blocks."""
    from clisonix_gpu.nn import LIAMLinear
    from clisonix_gpu.ops.activations import TABLE

    if quick and not in_quick:
        pytest.skip("not in --quick")
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    steps = {
        "clisonix": _layer_step(LIAMLinear.from_linear(linear, activation), x, None),
        "nn.Linear + activation": _layer_step(linear, x, TABLE[activation].torch),
    }
    case = f"LIAMLinear forward+backward {m}x{k}x{n} float32 {activation} ({'torch-cuda' if DEVICE == 'cuda' else 'torch-cpu'})"
    ref = reference_transform_matrix(x, linear.weight, linear.bias, activation)
    errors = {
        impl: float(np.abs(step().detach().double().cpu().numpy() - ref).max() / max(np.abs(ref).max(), 1e-300)) for impl, step in steps.items()
    }
    seconds = measure_alternating(steps, DEVICE, rounds=3 if quick else 7)
    for impl in steps:
        record(Result(case, impl, DEVICE, seconds[impl], errors[impl], flops=3 * 2.0 * m * n * k))
