"""``clisonix-gpu`` command line: ``info``, ``bench`` and ``demo``."""

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
        f"numpy {_version('numpy')}, torch {_version('torch')}, triton {_version('triton')}, "
        f"{cupy} {_version(cupy)}",
        "devices:",
        *(f"  {d}" for d in _devices()),
        f"backends (requested: {current_backend()}):",
    ]
    for b in backends():
        lines.append(f"  {b.name:7s} {'usable' if b.usable else 'unusable: ' + b.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clisonix-gpu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and usable backends")
    bench = sub.add_parser("bench", help="run the benchmark suite (bench/) and print the ratio table")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    bench.add_argument("pytest_args", nargs="*", help="extra arguments for pytest")
    demo = sub.add_parser("demo", help="train, compress and binarize small classifiers on scikit-learn datasets")
    demo.add_argument("--out", type=Path, default=None, help="folder for demo.md and demo.png")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
        return 0
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        parser.error(f"the benchmark suite lives in a source checkout; {bench_dir} does not exist")
    cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "-p", "no:cacheprovider"]
    cmd += (["--quick"] if args.quick else []) + args.pytest_args
    return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
