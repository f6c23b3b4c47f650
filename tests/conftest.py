"""Test setup: the Triton kernels run on CUDA when there is a GPU, else in the CPU interpreter.

``CLISONIX_REQUIRE_GPU=1`` turns every skipped GPU test into a failure (the lent-GPU check).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

REQUIRE_GPU = os.environ.get("CLISONIX_REQUIRE_GPU", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # must be set before any kernel module is imported: triton.jit reads it at decoration time
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the Triton path runs in this session: real GPU, or CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def gpu_or_skip(reason: str = "needs a CUDA device") -> None:
    """Skip (or fail under CLISONIX_REQUIRE_GPU=1) when there is no CUDA device."""
    if HAS_CUDA:
        return
    if REQUIRE_GPU:
        pytest.fail(f"CLISONIX_REQUIRE_GPU=1 but {reason}: no CUDA device", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu"):
        gpu_or_skip()


# Fresh inputs every run; CLISONIX_TEST_SEED=<seed from the report header> replays a run.
SESSION_SEED = int(os.environ.get("CLISONIX_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)


def pytest_report_header(config: pytest.Config) -> str:
    where = "CUDA" if HAS_CUDA else "CPU (TRITON_INTERPRET=1)"
    return f"clisonix: CLISONIX_TEST_SEED={SESSION_SEED}, Triton kernels on {where}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator per test from the session seed and the test's id."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])
