"""Starting a mesh: the edge's :func:`connect`, the worker's entry (``clisonix-gpu worker``) and
the one-command torchrun launch.

Trust model: torch.distributed has no authentication and no encryption, so the mesh is for
loopback or a trusted network only. The edge's rendezvous store listens on ``master_addr`` alone
(127.0.0.1 by default; never the wildcard address), Gloo is pinned to the loopback interface
when the mesh is local, and anything else is an explicit choice that warns.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import math
import os
import signal
import socket
import subprocess
import sys
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import TCPStore
from torch.distributed.rendezvous import rendezvous

from .. import alda
from . import wire
from .edge import Mesh, MeshError, WorkerLink
from .transport import GROUP_TIMEOUT, Inbox, Outbox, groups
from .worker import serve

SUPERVISED_ENV = "CLISONIX_MESH_SUPERVISED"  # set in the serving child of a worker under torchrun
NO_AUTH_WARNING = (
    "the mesh listens on {addr}: torch.distributed has no authentication or encryption, so anyone "
    "who reaches this address can join or disturb the mesh; use a private network or a tunnel"
)


class LaunchError(Exception):
    """A worker's environment is unusable (the message is one line for the terminal)."""


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (capped at 2**20) where
    the system allows; returns the soft limit now in force. Gloo keeps a descriptor per
    connection, and stray connections to its port cost one each until the process ends."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)


def is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _check_connect_arguments(
    workers: object, master_addr: object, master_port: object, timeout: object, fallback: object, backend: object, max_in_flight: object
) -> None:
    """``TypeError`` naming the first argument of the wrong type, ``ValueError`` for one out of range."""

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if workers is not None and not is_int(workers):
        raise TypeError(f"workers must be an int or None; got {type(workers).__name__} {workers!r}")
    if not isinstance(master_addr, str):
        raise TypeError(f"master_addr must be a str; got {type(master_addr).__name__}")
    if master_port is not None and not is_int(master_port):
        raise TypeError(f"master_port must be an int or None; got {type(master_port).__name__} {master_port!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds; got {type(timeout).__name__} {timeout!r}")
    if not isinstance(fallback, str):
        raise TypeError(f"fallback must be a str ('local' or 'raise'); got {type(fallback).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str; got {type(backend).__name__}")
    if not is_int(max_in_flight):
        raise TypeError(f"max_in_flight must be an int; got {type(max_in_flight).__name__} {max_in_flight!r}")
    if workers is not None and workers < 1:  # type: ignore[operator]
        raise ValueError(f"workers must be >= 1; got {workers}")
    if master_port is not None and not 0 <= master_port <= 65535:  # type: ignore[operator]
        raise ValueError(f"master_port must be in 0..65535; got {master_port}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout}")
    if fallback not in ("local", "raise"):
        raise ValueError(f"fallback must be 'local' or 'raise'; got {fallback!r}")
    if backend != "gloo":
        raise ValueError(f"backend must be 'gloo' (tensors travel through CPU memory); got {backend!r}")
    if max_in_flight < 1:  # type: ignore[operator]
        raise ValueError(f"max_in_flight must be >= 1; got {max_in_flight}")


def _listening_store(addr: str, port: int, world_size: int, timeout: float) -> tuple[Any, socket.socket]:
    """A rendezvous store that listens on ``addr`` only (TCPStore alone would take every
    interface), and its listening socket, which must stay open while the store serves."""
    host = "127.0.0.1" if addr == "localhost" else addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(256)
        store = TCPStore(
            host, listener.getsockname()[1], world_size, True, datetime.timedelta(seconds=timeout), wait_for_workers=False,
            master_listen_fd=listener.fileno(),
        )  # fmt: skip
    except BaseException:
        listener.close()
        raise
    return store, listener


def connect(
    workers: int | None = None, *, master_addr: str = "127.0.0.1", master_port: int | None = None, timeout: float = 30.0,
    fallback: str = "local", backend: str = "gloo", max_in_flight: int = 4,
) -> Mesh:  # fmt: skip
    """Join (or start) a mesh as the edge, rank 0.

    ``workers=n`` starts n local worker processes (``clisonix-gpu worker``) that reach the edge
    at ``master_addr`` (default 127.0.0.1, where the rendezvous store then listens; any other
    address warns: torch.distributed has no authentication). Without ``workers``, the ranks come
    from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``; see ``clisonix-gpu worker --edge``). ``timeout`` is the deadline in seconds
    for one request's work on a worker (and for a local fallback); ``fallback`` is "local" or
    "raise"; ``max_in_flight`` bounds the requests on the wire per worker. Raises ``TypeError``
    naming an argument of the wrong type, ``ValueError`` for ``workers`` < 1, a bad ``fallback``,
    ``timeout`` <= 0 or ``max_in_flight`` < 1.

    Example:

    >>> from clisonix_gpu import mesh
    >>> x, w = torch.randn(300, 16), torch.randn(4, 16)
    >>> with mesh.connect(workers=2, timeout=30) as m:  # two local worker processes
    ...     y = m.offload("transform_matrix", x, w, activation="relu")
    ...     z = m.map("transform_matrix", x, w, activation="relu")  # rows split across both
    ...     alive = [s["alive"] for s in m.status()]
    >>> bool(torch.equal(y, cg.transform_matrix(x, w, activation="relu"))), bool(torch.equal(z, y)), alive
    (True, True, [True, True, True])
    """
    _check_connect_arguments(workers, master_addr, master_port, timeout, fallback, backend, max_in_flight)
    raise_fd_limit()
    processes: dict[int, subprocess.Popen[bytes]] = {}
    listener: socket.socket | None = None
    store: Any = None
    if workers is not None:
        addr, world = master_addr, workers + 1
    else:
        addr, world = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("WORLD_SIZE", "1"))
        if int(os.environ.get("RANK", "0")) != 0:
            raise RuntimeError("connect() is for rank 0 (the edge); other ranks run clisonix-gpu worker")
    if is_loopback(addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        if workers is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent holds the store
            store, _, _ = next(rendezvous("env://", rank=0, world_size=world, timeout=datetime.timedelta(seconds=max(timeout, 60))))
        else:
            port = master_port if workers is not None else int(os.environ.get("MASTER_PORT", "0"))
            store, listener = _listening_store(addr, port or 0, world, max(timeout, 60))
            if not is_loopback(addr):
                warnings.warn(NO_AUTH_WARNING.format(addr=addr), UserWarning, stacklevel=2)
        if workers is not None:
            env = dict(os.environ, MASTER_ADDR=addr, MASTER_PORT=str(store.port), WORLD_SIZE=str(world))
            env["CLISONIX_MESH_CONNECT_TIMEOUT"] = str(max(timeout, 60))
            # Local workers share the edge's cores. OpenMP threads that spin after each op of a worker
            # starve the transport threads of every process (measured: 256 KiB round trip p50 3.4 ms
            # with spinning, 1.0 ms without); sleeping at once costs the ops nothing measurable.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            for rank in range(1, world):
                processes[rank] = subprocess.Popen([sys.executable, "-m", "clisonix_gpu.cli", "worker"], env=dict(env, RANK=str(rank)))
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=datetime.timedelta(seconds=max(timeout, 60)))
        links = _greet(groups(world), processes)
    except BaseException:
        for p in processes.values():
            p.kill()
            p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        if listener is not None:
            listener.close()
        raise
    mesh = Mesh(links, timeout=float(timeout), fallback=fallback, max_in_flight=max_in_flight)
    mesh._keep_open = (store, listener)  # type: ignore[attr-defined]  # the store serves while the mesh lives
    atexit.register(_close_at_exit, weakref.ref(mesh))
    return mesh


def _greet(by_rank: dict[int, Any], processes: dict[int, subprocess.Popen[bytes]]) -> list[WorkerLink]:
    """Read every worker's greeting: device, capacity, host and pid. The process groups exist, so
    every worker is connected: a worker that ends before it greets ends the wait with an error."""
    links = []
    for rank, group in by_rank.items():
        inbox = Inbox(rank, group)
        words, body = inbox.receive()
        if words[: wire.VERSION_AT + 1] != [wire.MAGIC, wire.VERSION] or words[wire.CODE_AT] != wire.HELLO or body is None:
            raise MeshError(f"rank {rank} did not greet as a worker of protocol version {wire.VERSION}")
        host, namespace = (bytes(t.tolist()).decode(errors="replace") for t in wire.unpack(body, wire.decode_specs(words, 1024)[0], copy=True))
        kind, capacity, pid = words[wire.PARAMS_AT : wire.PARAMS_AT + 3]
        device = alda.Device("cuda" if kind else "cpu", rank, max(capacity / 1000, 1e-3))
        links.append(WorkerLink(rank, group, device, host, pid, namespace, inbox, Outbox(rank, group, deadlines=True), processes.get(rank)))
    return links


def _close_at_exit(ref: weakref.ref[Mesh]) -> None:
    mesh = ref()
    if mesh is not None:
        mesh.close()


# ----------------------------------------------------------------------------- the worker's entry


def worker_environment() -> tuple[int, int, str]:
    """(RANK, WORLD_SIZE, MASTER_ADDR) of this process; ``LaunchError`` saying what is missing or wrong."""

    def integer(name: str) -> int:
        text = os.environ.get(name)
        if text is None:
            raise LaunchError(f"{name} is not set; a worker reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun sets them; see --help)")
        try:
            return int(text)
        except ValueError:
            raise LaunchError(f"{name} must be an integer; got {text!r}") from None

    rank, world = integer("RANK"), integer("WORLD_SIZE")
    if world < 2:
        raise LaunchError(f"WORLD_SIZE must be at least 2 (the edge and one worker); got {world}")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    port = integer("MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT must be in 1..65535; got {port}")
    return rank, world, os.environ.get("MASTER_ADDR", "127.0.0.1")


def worker_main(edge_program: Sequence[str] = ()) -> int:
    """Entry of ``clisonix-gpu worker``: serve as rank >= 1 of the environment's mesh; on rank 0,
    run ``edge_program`` (a Python file and its arguments) as the edge. Returns the exit status;
    a bad environment prints one line and returns 2."""
    try:
        rank, world, addr = worker_environment()
        if rank == 0 and not edge_program:
            raise LaunchError("rank 0 is the edge: name its program (clisonix-gpu worker --edge app.py) or start rank 0 with mesh.connect()")
    except LaunchError as exc:
        print(f"clisonix-gpu worker: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        return run_edge_program(edge_program)
    if os.environ.get("TORCHELASTIC_RUN_ID") and not os.environ.get(SUPERVISED_ENV):
        return _supervise(rank)
    return _serve_from_environment(rank, world, addr)


def _serve_from_environment(rank: int, world: int, addr: str) -> int:
    raise_fd_limit()
    if is_loopback(addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    wait_s = float(os.environ.get("CLISONIX_MESH_CONNECT_TIMEOUT") or 600)
    try:
        store, _, _ = next(rendezvous("env://", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=wait_s)))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"clisonix-gpu worker: rank {rank}: no mesh at {addr}:{os.environ.get('MASTER_PORT')} within {wait_s:g} s ({first_line})", file=sys.stderr
        )
        return 1
    try:
        serve()
    except RuntimeError as exc:  # the edge went away without a shutdown
        print(f"clisonix-gpu worker: rank {rank}: the edge's connection ended ({str(exc).strip().splitlines()[0]})", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


def _supervise(rank: int) -> int:
    """Under torchrun, serve in a child process and end with status 0 whatever becomes of it:
    torchrun's agent stops every rank when one fails, and a worker's death must not take the edge
    or the other workers with it (the edge fails its requests over)."""
    child = subprocess.Popen([sys.executable, "-m", "clisonix_gpu.cli", "worker"], env=dict(os.environ, **{SUPERVISED_ENV: "1"}))

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    if code != 0:
        how = f"signal {-code}" if code < 0 else f"status {code}"
        print(f"clisonix-gpu worker: rank {rank}: serving process {child.pid} ended with {how}; the other ranks carry on", file=sys.stderr)
    return 0


def run_edge_program(argv: Sequence[str]) -> int:
    """Rank 0 under torchrun: run ``argv[0]`` (a Python file; the rest are its arguments) as
    ``__main__``, as ``python app.py ...`` would; its ``mesh.connect()`` joins the other ranks.
    A mesh it leaves open is closed at exit, which lets the workers end."""
    import runpy

    path = os.path.abspath(argv[0])
    sys.argv = [path, *argv[1:]]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0
