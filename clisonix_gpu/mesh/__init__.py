"""Neural Mesh: offload tensors from this process (the edge, rank 0) to workers (ranks >= 1) over
torch.distributed point-to-point messages, with failover; nothing is lost or answered twice.

The package, file by file:

* ``allowlist``: the ops a worker serves, their integer parameters and the bounds of each.
* ``wire``: the message format (a fixed int64 header with named fields, raw tensor bytes, a
  trailer); no pickle, no processes: tested on its own.
* ``transport``: messages between two ranks over torch.distributed, receives posted ahead,
  deadlines that never run into a Gloo timeout.
* ``worker``: the serving loop of ranks >= 1 (:func:`serve`).
* ``edge``: rank 0's :class:`Mesh`: load spreading, deadlines, re-admission, failover.
* ``launch``: :func:`connect`, ``clisonix-gpu worker`` and the torchrun launch.

Security: torch.distributed has no authentication or encryption. The mesh listens on 127.0.0.1
unless told otherwise; across hosts, run it inside a private network or an SSH/WireGuard tunnel.
"""

from __future__ import annotations

from .allowlist import OPS
from .edge import Mesh, MeshError
from .launch import connect
from .launch import worker_main as worker_main  # the entry of `clisonix-gpu worker`
from .worker import serve

__all__ = ["Mesh", "MeshError", "OPS", "connect", "serve"]
