"""``clisonix-gpu`` command line: ``info``, ``bench``, ``kernels``, ``demo`` and ``worker``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

from . import __version__
from ._dispatch import backends, current_backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["cpu (torch not installed)"]
    found = [f"cpu: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    return found


def info() -> str:
    """Versions, devices and backends (usable or why not) as printable text."""
    cupy = next((d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if _version(d) != "not installed"), "cupy")
    lines = [
        f"clisonix-gpu {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"numpy {_version('numpy')}, torch {_version('torch')}, triton {_version('triton')}, {cupy} {_version(cupy)}",
        "devices:",
        *(f"  {d}" for d in _devices()),
        f"backends (requested: {current_backend()}):",
    ]
    for b in backends():
        lines.append(f"  {b.name:7s} {'usable' if b.usable else 'unusable: ' + b.reason}")
    from .ops.transform_matrix import transform_matrix_cpu_method

    lines.append("CPU transform_matrix (per case; cg.transform_matrix_cpu_method(k, n, dtype) for others):")
    lines += [f"  K=N=1024 {dtype}: {transform_matrix_cpu_method(1024, 1024, dtype)}" for dtype in ("float32", "float64")]
    lines.append(f"  K=256 N=10 float32: {transform_matrix_cpu_method(256, 10, 'float32')}")

    from .ops.binary._numba import status as binary_cpu_path

    lines.append(f"binary ops on CPU: {binary_cpu_path()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clisonix-gpu", description="GPU compute kernels: versions and backends, benchmarks, a demo, mesh workers.")
    parser.add_argument("--version", action="version", version=f"clisonix-gpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and usable backends")
    bench = sub.add_parser(
        "bench",
        help="time every op against its best peer; a table, and JSON, Markdown and PNG files",
        description="Time every op against its best peer in the same run. Needs the bench extra: pip install 'clisonix-gpu[bench]'.",
    )
    bench.add_argument("--ops", default=",".join(BENCH_OPS), help=f"comma-separated, from {', '.join(BENCH_OPS)}")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    bench.add_argument("--tiny", action="store_true", help="toy shapes: checks the harness, not the speed")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    where = bench.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help=f"results folder (default: ./{DEFAULT_BENCH_OUT})")
    where.add_argument(
        "--publish",
        action="store_true",
        help="source checkout only: write the reference results to bench/results and refresh README's performance section",
    )
    where.add_argument(
        "--update-readme", action="store_true", help="source checkout only: refresh README's performance section from bench/results and exit"
    )
    bench.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    kernels = sub.add_parser(
        "kernels", help="machine code of every kernel variant on sm_90: registers, spills, shared memory, tensor cores, occupancy"
    )
    kernels.add_argument("--json", action="store_true", help="rows as JSON instead of a Markdown table")
    worker = sub.add_parser(
        "worker", help="serve as a mesh worker (ranks >= 1), or run the edge's program on rank 0 (--edge)",
        description=WORKER_DESCRIPTION, epilog=WORKER_ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    worker.add_argument(
        "--edge",
        nargs=argparse.REMAINDER,
        default=[],
        metavar="PROGRAM",
        help="on rank 0: the Python file (then its arguments) that calls mesh.connect()",
    )
    demo = sub.add_parser("demo", help="train, compress and binarize small classifiers on scikit-learn datasets")
    demo.add_argument("--out", type=Path, default=None, help="folder for demo.md and demo.png")
    args = parser.parse_args(argv)
    if args.command == "info":
        try:
            text = info()
        except ValueError as exc:  # a bad setting, e.g. CLISONIX_BACKEND=gpu: one line, not a traceback
            print(f"clisonix-gpu info: {exc}", file=sys.stderr)
            return 2
        print(text)
        return 0
    if args.command == "kernels":
        from ._kernel_sheet import main as kernel_sheet

        return kernel_sheet(["--json"] if args.json else [])
    if args.command == "worker":
        from .mesh import worker_main

        return worker_main(args.edge)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
        return 0
    return _bench(parser, args)


WORKER_DESCRIPTION = """\
Ranks >= 1 serve mesh requests from rank 0 (the edge). Under torchrun, one command starts the edge
and its workers, and a worker that dies leaves the edge and the other workers running:

  torchrun --nproc-per-node 3 --no-python clisonix-gpu worker --edge app.py [ARGS...]

Rank 0 runs app.py, whose mesh.connect() joins the two workers."""
WORKER_ENVIRONMENT = """\
environment (torchrun sets the first four):
  RANK         this process's rank: 1..WORLD_SIZE-1 serve; rank 0 runs the --edge program
  WORLD_SIZE   number of ranks, the edge included (at least 2)
  MASTER_ADDR  address of the rendezvous store (default 127.0.0.1)
  MASTER_PORT  its port
  CLISONIX_MESH_CONNECT_TIMEOUT  seconds to wait for the mesh before giving up (default 600)
  GLOO_SOCKET_IFNAME  network interface for Gloo (lo when MASTER_ADDR is loopback)"""

BENCH_OPS = ("transform_matrix", "svd_compress", "binary", "alda", "mesh")
DEFAULT_BENCH_OUT = "clisonix-gpu-bench"


def _bench_suite() -> Path:
    """The folder of the benchmark suite (the subpackage ``clisonix_gpu.bench``)."""
    spec = importlib.util.find_spec("clisonix_gpu.bench")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("clisonix_gpu.bench is missing from this installation; reinstall clisonix-gpu")
    return Path(spec.origin).parent


def _source_checkout(suite: Path) -> Path | None:
    """The source checkout the suite runs from (an editable install), or None for an installed package."""
    root = suite.parent
    return root if (root / "pyproject.toml").is_file() and (root / "README.md").is_file() and (suite / "results").is_dir() else None


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._bench_report import update_readme

    suite = _bench_suite()
    publish_to = None
    if args.publish or args.update_readme:
        checkout = _source_checkout(suite)
        if checkout is None:
            flag = "--publish" if args.publish else "--update-readme"
            parser.error(f"{flag} writes the project's reference results, which live in a source checkout (git clone, then pip install -e .)")
        publish_to = checkout / "bench" / "results"
        if args.update_readme:
            used = update_readme(checkout / "README.md", publish_to)
            print(f"README performance section rewritten from {', '.join(map(str, used)) or 'no results'}")
            return 0
    if args.publish and args.tiny:
        parser.error("--publish takes a full or --quick run: toy shapes (--tiny) are no reference")
    missing = [name for name in ("pytest", "pytest_benchmark") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"the benchmarks need the bench extra ({', '.join(missing)} missing): pip install 'clisonix-gpu[bench]'")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(BENCH_OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(BENCH_OPS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    out = publish_to or args.out or Path(DEFAULT_BENCH_OUT)
    env = dict(os.environ)
    env.update(
        {"CLISONIX_BENCH_DEVICE": args.device or "", "CLISONIX_BENCH_OUT": str(out.resolve()), "CLISONIX_BENCH_TINY": "1" if args.tiny else "0"}
    )
    files = [str(suite / f"bench_{op}.py") for op in ops]
    cmd = [sys.executable, "-m", "pytest", *files, "-c", str(suite / "pytest.ini"), f"--rootdir={suite}", "-q", "--benchmark-quiet"]
    cmd += (["--quick"] if args.quick else []) + args.pytest_args
    status = subprocess.call(cmd, env=env)
    if status == 0 and publish_to is not None:
        used = update_readme(publish_to.parent.parent / "README.md", publish_to)
        print(f"published to {out}; README performance section rewritten from {', '.join(map(str, used))}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
