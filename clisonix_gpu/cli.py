"""``clisonix-gpu`` command line: ``info``, ``bench``, ``demo`` and ``worker``."""

from __future__ import annotations

import argparse
import importlib.metadata
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
    from .ops.binary._numba import status as binary_cpu_path

    lines.append(f"binary ops on CPU: {binary_cpu_path()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clisonix-gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and usable backends")
    bench = sub.add_parser("bench", help="benchmarks against each op's best peer; table, JSON, Markdown and PNG")
    bench.add_argument("--ops", default=",".join(BENCH_OPS), help=f"comma-separated, from {', '.join(BENCH_OPS)}")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    bench.add_argument("--tiny", action="store_true", help="toy shapes: checks the harness, not the speed")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    bench.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    bench.add_argument("--update-readme", action="store_true", help="rewrite README's performance section from bench/results and exit")
    bench.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    sub.add_parser("worker", help="serve as a mesh worker (ranks >= 1; RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun)")
    demo = sub.add_parser("demo", help="train, compress and binarize small classifiers on scikit-learn datasets")
    demo.add_argument("--out", type=Path, default=None, help="folder for demo.md and demo.png")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "worker":
        from .mesh import worker_main

        return worker_main()
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
        return 0
    return _bench(parser, args)


BENCH_OPS = ("transform_matrix", "svd_compress", "binary", "alda", "mesh")


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    bench_dir = root / "bench"
    if not bench_dir.is_dir():
        parser.error(f"the benchmark suite lives in a source checkout; {bench_dir} does not exist")
    if args.update_readme:
        from ._bench_report import update_readme

        used = update_readme(root / "README.md", args.out or bench_dir / "results")
        print(f"README performance section rewritten from {', '.join(map(str, used)) or 'no results'}")
        return 0
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(BENCH_OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {', '.join(BENCH_OPS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    env = dict(os.environ)
    env.update({k: v for k, v in {
        "CLISONIX_BENCH_DEVICE": args.device or "",
        "CLISONIX_BENCH_OUT": str(args.out) if args.out else "",
        "CLISONIX_BENCH_TINY": "1" if args.tiny else "0",
    }.items()})  # fmt: skip
    files = [str(bench_dir / f"bench_{op}.py") for op in ops]
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--benchmark-quiet", f"--rootdir={root}"]
    cmd += (["--quick"] if args.quick else []) + args.pytest_args
    return subprocess.call(cmd, env=env, cwd=root)


if __name__ == "__main__":
    raise SystemExit(main())
