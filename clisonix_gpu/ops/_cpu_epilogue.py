"""Bias and activation, in place, on a CPU GEMM's output, rounding every element alike wherever it lies.

Adding the bias, ReLU and leaky ReLU are exact per element. torch's SIMD and scalar code for the
erf, exp and tanh-based activations differ in the last bit, and torch runs the scalar code on the
tail of each thread's chunk of a tensor, so an element's bits would depend on where the tensor (or
a thread's share) ends, hence on the batch size. Those activations run in pieces whose lengths
torch's threading splits only at multiples of 64 elements (one grain per thread, or one thread);
the last elements that do not fill 64 go through a zero-padded 64-element scratch buffer. So
every element takes the SIMD code. float32 GELU runs as one call on the whole vectors: torch hands
it to oneDNN, whose kernel rounds every element alike wherever a call or a thread's share ends
(measured; the tests pin it); a call on fewer than 64 elements takes other code, hence the scratch
buffer there too.
"""

from __future__ import annotations

from typing import Any

from .activations import TABLE

__all__ = ["VECTOR_MULTIPLE", "apply_epilogue_"]

VECTOR_MULTIPLE = 64  # elements: a multiple of twice the widest SIMD vector torch uses
# one rounding (or none) per element, the same in torch's SIMD and scalar code
_EXACT_PER_ELEMENT = frozenset({"relu", "leaky_relu"})
_GRAIN = 32768  # torch's grain size: an elementwise call on fewer elements runs in one thread
_GELU_GRAIN = 6144  # torch threads GELU above this many elements


def _piece_lengths(activation: str, dtype: Any, length: int) -> tuple[int, int]:
    """(parallel piece, serial piece) in elements for ``activation`` (not ReLU or leaky ReLU, which
    round alike in any code) on ``length`` elements, a multiple of 64: pieces that torch's threading
    splits only at whole vectors.

    torch splits an elementwise call of L elements over T = min(threads, ceil(L / grain)) threads in
    chunks of ceil(L / T) (one thread when T = 1). Where that chunk is a multiple of 64, the whole
    length is one call. Otherwise a piece of ``threads * grain`` elements gives each thread exactly
    ``grain`` of them (a multiple of 64), and a piece of at most ``grain`` runs in one thread. float32
    GELU runs in oneDNN, whose kernel rounds every element alike wherever a call of whole vectors ends
    (tested), and costs about 18 us a call on this VM whatever its length: always one call."""
    import torch

    if activation == "gelu" and dtype == torch.float32:
        return max(length, 1), 1
    grain = _GELU_GRAIN if activation in ("gelu", "gelu_tanh") else _GRAIN
    threads = torch.get_num_threads()
    tasks = min(threads, -(-length // grain))
    if tasks <= 1 or (-(-length // tasks)) % VECTOR_MULTIPLE == 0:
        return max(length, 1), 1
    return grain * threads, grain


def apply_epilogue_(out: Any, bias: Any, activation: str | None, keep_preactivation: bool = False) -> Any:
    """Bias and activation in place on ``out``, a contiguous (rows, N) CPU tensor, float32 or
    float64; ``bias`` (N,) or None. Returns a copy of ``out`` before the activation with
    ``keep_preactivation``, else None.

    The bias runs as one call (all threads: exact per element). The activation runs in pieces that
    torch's threading splits only at whole vectors (:func:`_piece_lengths`), or in one call where
    that says so."""
    if bias is not None:
        out += bias
    preactivation = out.clone() if keep_preactivation else None
    if activation is None or out.numel() == 0:
        return preactivation
    in_place = TABLE[activation].torch_
    if activation in _EXACT_PER_ELEMENT:
        in_place(out)
        return preactivation
    import torch

    numel = out.numel()
    whole = numel - numel % VECTOR_MULTIPLE
    parallel, serial = _piece_lengths(activation, out.dtype, whole)
    if whole == numel and parallel == whole:
        in_place(out)  # one call on all of it
        return preactivation
    flat = out.view(-1)
    threaded = whole - whole % parallel
    for start in range(0, threaded, parallel):
        in_place(flat[start : start + parallel])
    for start in range(threaded, whole, serial):
        in_place(flat[start : min(start + serial, whole)])
    if whole < numel:
        scratch = torch.zeros(VECTOR_MULTIPLE, dtype=flat.dtype, device="cpu")
        scratch[: numel - whole] = flat[whole:]
        in_place(scratch)
        flat[whole:] = scratch[: numel - whole]
    return preactivation
