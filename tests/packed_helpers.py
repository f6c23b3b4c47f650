"""Shared by the tests of the packed-weight cache and of the page-write record behind it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch

import clisonix_gpu as cg
from clisonix_gpu.ops import _packed_gemm


@pytest.fixture(autouse=True)
def empty_cache():
    """Every test starts and ends with no packed weight cached (imported, it applies to the module)."""
    _packed_gemm.release_packed_weights()
    yield
    _packed_gemm.release_packed_weights()


def fresh(x, w, b=None, activation="silu"):
    """The op's answer on a private copy of ``w``: a new object, so nothing cached applies."""
    copy = w.copy() if isinstance(w, np.ndarray) else w.detach().clone()
    return cg.transform_matrix(x, copy, b, activation)


def same(a, b):
    """Bit-equal float32 results (NumPy arrays or tensors)."""
    a, b = (t.numpy() if isinstance(t, torch.Tensor) else t for t in (a, b))
    return np.array_equal(a.view(np.uint32), b.view(np.uint32))


def run_at_once(work: Callable[..., Any], arguments: Iterable[Any]) -> None:
    """``work(argument)`` for every argument, each in its own thread, all started before any is
    joined."""
    threads = [threading.Thread(target=work, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
