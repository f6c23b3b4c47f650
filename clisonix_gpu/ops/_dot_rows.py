"""Batch-invariant ``x @ w.T`` for narrow weights (at most 15 outputs) on CPU: each output one
vectorized dot product, every row computed alike.

A weight of N <= 15 rows (a low-rank layer's first factor at a small rank, a classifier head) is
where MKL does worst on a 2-core VM, and where its packed GEMM is least predictable: on an AMD
EPYC it took 56-67 us for 360 rows of K = 256 at N = 2, 4 or 8 (20-31 us at N = 16), and its rows
at N = 5, 7, 9 and 10 round by position, which sends those cases to the row tiles. Here every
output ``out[i, j]`` is the dot product of row ``x[i]`` with row ``w[j]``: one loop over K that
LLVM vectorizes over K (partial sums in vector lanes, folded in a fixed order at the end), the same
machine code for every row. So a row's bits depend on that row, its output column and the case
(K, N), never on the batch around it; the partial sums also make it more accurate than one chain
of K multiply-adds (measured: within NumPy's own sgemm error at every shape tried).

Measured on that EPYC, 360 rows of K = 256: N = 2 in 12 us, N = 8 in 23 us, N = 15 in 50 us
(MKL: 67, 75 and 70 us); from N = 16 up MKL's kernels, which fill 16 outputs at a time, are faster
(31 us against 46 at N = 16; 40 against 82 at N = 32), so the method stops at 15 outputs. A batch
of 2^22 multiply-adds or more runs in one piece of rows per torch thread.

The check (:func:`dot_ok`) confirms the invariance per case at first use, as the other methods'
checks do, because it rests on code generation: the kernel always gets C-contiguous float32 rows
by address (one compiled specialization), and LLVM's vectorized loop and its remainder depend on
K alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._cpu_epilogue import apply_epilogue_
from ._numba_gemm import bias_address, dot_kernel
from ._tiled_gemm import call_settings, cpu_gemm_mode, rows_independent, small_batches_match
from .utils import cdiv, cpu_workers, float32_rows

__all__ = ["DOT_ROWS", "MAX_OUTPUTS", "SPLIT_MACS", "DotRows", "dot_ok", "dot_rows", "dot_served", "dot_transform_matrix"]

MAX_OUTPUTS = 15  # N at most this: MKL's packed GEMM is faster from 16 outputs up (module docstring)
SPLIT_MACS = 1 << 22  # multiply-adds from which a call runs on every torch thread (a piece each): handing pieces to threads costs about 40 us
DOT_ROWS = "dot rows"  # the layer shortcuts' answer for a weight this method serves (transform_matrix._ready_gemm)
_verdicts: dict[tuple[int, int], bool] = {}


class DotRows(NamedTuple):
    """The method of a case this module serves (what :func:`dot_ok` established)."""

    k: int
    n: int


def dot_rows(x: Any, w: Any, bias: Any = None) -> Any:
    """``x @ w.T + bias`` (M, N) float32 tensor for contiguous float32 CPU tensors ``x`` (M, K) and
    ``w`` (N, K), M >= 0, K >= 1, 1 <= N <= 15, and ``bias`` (N,) float32 or None (added as torch
    adds it). Batches of ``SPLIT_MACS`` multiply-adds or more run in one piece of rows per torch
    thread. The caller has checked that the kernel compiled (:func:`._numba_gemm.dot_kernel`)."""
    kernel = dot_kernel()
    assert kernel is not None
    m, k = x.shape
    n = w.shape[0]
    out = float32_rows(m, n)
    keeper, bias_at = bias_address(bias)
    x_at, w_at, out_at = x.data_ptr(), w.data_ptr(), out.data_ptr()
    threads = call_settings()[0] if m * k * n >= SPLIT_MACS and m > 1 else 1
    if threads == 1:
        kernel.call(kernel.address, x_at, w_at, out_at, m, k, n, bias_at)
    else:
        step = cdiv(m, threads)
        pieces = [(x_at + start * k * 4, w_at, out_at + start * n * 4, min(step, m - start), k, n, bias_at) for start in range(0, m, step)]
        for done in [cpu_workers(threads).submit(kernel.call, kernel.address, *piece) for piece in pieces]:
            done.result()
    del keeper  # the bias the kernel read stays alive until here
    return out


def dot_transform_matrix(x: Any, w: Any, bias: Any, activation: str | None, keep_preactivation: bool = False) -> tuple[Any, Any]:
    """``(activation(x @ w.T + bias), preactivation)`` for float32 CPU tensors ``x`` (M, K), ``w``
    (N, K) and ``bias`` (N,) or None, in a case :func:`dot_ok` passed: (M, N) float32, and
    ``x @ w.T + bias`` with ``keep_preactivation`` (else None)."""
    out = dot_rows(x if x.is_contiguous() else x.contiguous(), w if w.is_contiguous() else w.contiguous(), bias)
    return out, apply_epilogue_(out, None, activation, keep_preactivation)


def dot_ok(k: int, n: int, dtype: Any) -> DotRows | None:
    """The method for this case where it serves it, else None: float32 compute (``dtype`` float32,
    float16 or bfloat16), 1 <= N <= 15, K >= 1, ``CLISONIX_CPU_GEMM`` auto, the kernel compiled
    (not ``CLISONIX_NUMBA=0``) and its check passed for (K, N) (run on first use, cached)."""
    import torch

    if dtype == torch.float64 or not (1 <= n <= MAX_OUTPUTS and k >= 1) or cpu_gemm_mode() != "auto" or dot_kernel() is None:
        return None
    return DotRows(k, n) if _checked(k, n) else None


def dot_served(k: int, n: int) -> bool:
    """Whether this method serves (K, N), 1 <= N <= 15, as far as is known without running its
    check: the check passed earlier. For the layer shortcuts, whose callers establish the rest (the
    kernel compiled and on, float32, ``CLISONIX_CPU_GEMM`` auto)."""
    return _verdicts.get((k, n)) is True


def _checked(k: int, n: int) -> bool:
    """Whether the check passed for (K, N), 1 <= N <= 15 (run on first use, cached)."""
    verdict = _verdicts.get((k, n))
    if verdict is None:
        verdict = _verdicts[(k, n)] = _check(k, n)
    return verdict


def _check(k: int, n: int) -> bool:
    """Does every row keep its bits at other positions, beside other rows, alone and in batches of
    2 to 33, from misaligned rows and with a misaligned ``w``? Random float32 rows of this case."""
    import torch

    gen = torch.Generator().manual_seed(2468)
    spare = torch.randn(n * k + 1, generator=gen, device="cpu")
    w_misaligned = spare[1:].view(n, k)
    w = w_misaligned.clone()
    count = 96
    x = torch.randn(count, k, generator=gen, device="cpu")

    def run(rows: Any) -> Any:
        return dot_rows(rows, w)

    reference = run(x)
    if not rows_independent(run, x, reference, 5, gen) or not small_batches_match(run, x, reference, smallest=1):
        return False
    shifted = torch.empty(count * k + 1, device="cpu")[1:].view(count, k)
    shifted.copy_(x)
    return torch.equal(run(shifted), reference) and torch.equal(dot_rows(x, w_misaligned), reference)
