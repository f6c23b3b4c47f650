"""Helpers shared by the Triton kernels: interpreter detection and autotune settings."""

from __future__ import annotations

import inspect
import os
from typing import Any

import triton

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_kwargs() -> dict[str, Any]:
    """Persist autotune timings on disk (Triton >= 3.4) so a new process does not re-tune."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}
