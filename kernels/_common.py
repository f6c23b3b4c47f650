"""Helpers shared by the Triton kernels and their launchers: the interpreter switch and autotune
settings. Importing this module needs no Triton, so the host package reads the switch from here too.
"""

from __future__ import annotations

import inspect
import os
from typing import Any


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Read at call time by the launchers and once at import by the kernels' autotune config lists
    (which Triton needs when a kernel is decorated).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_kwargs() -> dict[str, Any]:
    """Persist autotune timings on disk (Triton >= 3.4) so a new process does not re-tune."""
    import triton

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}
