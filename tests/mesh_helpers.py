"""Helpers shared by the mesh tests that start worker processes (every wait bounded)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch


def random_tensor(rng, *shape):
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def resume_workers(m):
    """SIGCONT every worker process of mesh ``m`` (a test may have stopped one)."""
    for p in m._processes:
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def wait_until(predicate, seconds):
    """Poll ``predicate`` until it holds (True) or ``seconds`` pass (False)."""
    until = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def answered(m):
    """Requests answered by each worker of mesh ``m``, in rank order."""
    return [s["answered"] for s in m.status() if s["rank"] != 0]
