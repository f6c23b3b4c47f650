"""Benchmark session: ``--quick``, a progress bar, device ceilings on GPU, and at the end the ratio
table on stdout plus ``<date>-<device>.{json,md,png}`` in the results folder: ``CLISONIX_BENCH_OUT``
(``clisonix-gpu bench`` sets it from ``--out``, or to the checkout's ``bench/results`` with
``--publish``), else ``clisonix-gpu-bench/`` in the current directory."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Peers and ours live in one process with up to three OpenMP pools (torch's, FAISS's, numba's)
# and OpenBLAS's own. They run with the waiting policy users have (OpenMP's default: spin a while,
# then sleep): every timed block starts after a pause longer than any pool spins (timing.py), so
# one side's idle threads never steal the cores of the next. Passive waiting for all would cost
# the many short parallel regions of MKL's small GEMMs a thread wake-up each (one 4096x4096 row:
# 4.7 ms against 2.6 ms), a cost users do not pay.

sys.path.insert(0, str(Path(__file__).parent))
from timing import DEVICE, RESULTS, TINY

from clisonix_gpu._bench_report import markdown, plot, terminal_table
from clisonix_gpu._roofline import best_seconds

RESULTS_DIR = Path(os.environ.get("CLISONIX_BENCH_OUT") or "clisonix-gpu-bench")
CHECKOUT = Path(__file__).resolve().parent.parent  # the source checkout, when the suite runs from one
_progress = None
CEILINGS: dict[str, float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="smaller shapes and fewer rounds")


@pytest.fixture
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--quick")) or TINY


# ----------------------------------------------------------------------------- progress bar


def pytest_collection_finish(session: pytest.Session) -> None:
    global _progress
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return
    _progress = Progress(
        TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=Console(file=sys.__stderr__), auto_refresh=False,
    )  # fmt: skip
    _progress.start()
    _progress.add_task("", total=len(session.items))
    if DEVICE == "cuda":
        _measure_ceilings()


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    if _progress is not None:
        _progress.update(_progress.task_ids[0], advance=1, description=nodeid.split("::")[-1][:70])
        _progress.refresh()


def _measure_ceilings() -> None:
    """What this GPU can do at best, measured now: a device-to-device copy and cuBLAS GEMMs
    (bf16, fp16, tf32, fp32); the roofline prices use them (clisonix_gpu._roofline)."""
    import torch
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    CEILINGS["copy_GBps"] = 2 * src.numel() / ms / 1e6  # read + write
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, dtype, allow_tf32 in [
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, False),
        ("tf32", torch.float32, True),
        ("fp32", torch.float32, False),
    ]:
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        CEILINGS[f"{name}_matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9


# ----------------------------------------------------------------------------- results


def _cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``, else what Python's platform reports): the
    BLAS peers and MKL's packed GEMM pick other kernels on Intel and AMD CPUs of one ISA."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _environment() -> dict[str, object]:
    import numpy
    import torch

    commit = ""
    if (CHECKOUT / ".git").exists():  # an installed suite has no commit of its own
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=CHECKOUT).stdout.strip()
        except OSError:
            pass
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"CPU x{os.cpu_count()} ({platform.machine()}, {_cpu_model()})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "device": device,
        "device_kind": DEVICE,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "command": "clisonix-gpu bench " + " ".join(a for a in sys.argv[1:] if a.startswith("--quick")),
        "tiny": TINY,
        "ceilings": CEILINGS,
    }


def _rows() -> list[dict[str, object]]:
    """One row per (case, peer), best peer first: our time, the peer's time in the same run, ratio."""
    rows = []
    for case in dict.fromkeys(r.case for r in RESULTS):
        entries = [r for r in RESULTS if r.case == case]
        ours = next((r for r in entries if r.impl == "clisonix"), None)
        peers = sorted((r for r in entries if r.impl != "clisonix"), key=lambda r: (r.impl.startswith("ceiling"), r.seconds))
        if ours is None:
            continue
        for rank, peer in enumerate(peers):
            rows.append(
                {
                    "case": case,
                    "op": case.split()[0],
                    "device": ours.device,
                    "ours_ms": ours.seconds * 1e3,
                    "peer": peer.impl,
                    "best_peer": rank == 0 and not peer.impl.startswith("ceiling"),
                    "peer_ms": peer.seconds * 1e3,
                    "speedup": peer.seconds / ours.seconds,
                    "ours_rel_error": ours.rel_error,
                    "peer_rel_error": peer.rel_error,
                    "ours_gflops": ours.flops / ours.seconds / 1e9 if ours.flops else None,
                    "ours_gbps": ours.bytes / ours.seconds / 1e9 if ours.bytes else None,
                    # the least time the device allows (roofline; measured ceilings where the run has them)
                    "best_ms": best_seconds(ours.ceiling, ours.ops, ours.bytes, CEILINGS) * 1e3 if ours.ceiling and ours.device == "cuda" else None,
                }
            )
    return rows


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _progress is not None:
        _progress.stop()
    if not RESULTS:
        return
    env = _environment()
    rows = _rows()
    text = f"# Benchmarks\n\n{markdown(env, rows)}"
    print("\n" + terminal_table(env, rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(env["device"])).strip("-").lower()
    stem = RESULTS_DIR / f"{env['date'][:10]}-{slug}{'-tiny' if TINY else ''}"  # one file set per day and device
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows, "raw": [r.__dict__ for r in RESULTS]}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    plot(rows, stem.with_suffix(".png"), f"{env['device']}, {env['date']}")
    print(f"results written to {stem.resolve()}.{{json,md,png}}", file=sys.__stderr__)
