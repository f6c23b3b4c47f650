"""Benchmark session: ``--quick`` option, and the ratio table + JSON/Markdown at the end."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from timing import RESULTS, Result  # noqa: E402

RESULTS_DIR = Path(os.environ.get("CLISONIX_BENCH_OUT", Path(__file__).parent / "results"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="smaller shapes and fewer rounds")


@pytest.fixture
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--quick"))


def _environment() -> dict[str, str]:
    import numpy
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "device": device,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
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
                    "device": ours.device,
                    "ours_ms": ours.seconds * 1e3,
                    "peer": peer.impl + (" (best)" if rank == 0 and not peer.impl.startswith("ceiling") else ""),
                    "peer_ms": peer.seconds * 1e3,
                    "speedup": peer.seconds / ours.seconds,
                    "ours_rel_error": ours.rel_error,
                    "peer_rel_error": peer.rel_error,
                    "ours_gflops": ours.flops / ours.seconds / 1e9 if ours.flops else None,
                    "ours_gbps": ours.bytes / ours.seconds / 1e9 if ours.bytes else None,
                }
            )
    return rows


def _markdown(env: dict[str, str], rows: list[dict[str, object]]) -> str:
    lines = [
        f"# Benchmarks: {env['device']}, {env['date']}",
        "",
        f"commit {env['commit']}, Python {env['python']}, NumPy {env['numpy']}, torch {env['torch']}, "
        f"Triton {env['triton']}. Speedup = peer time / our time (> 1: we are faster), both measured "
        "in the same run, median of several rounds; one row per peer, the fastest marked (best). "
        "Errors are max |y - ref| / max |ref| against a float64 reference, except where the case "
        "names another measure.",
        "",
        "| case | ours (ms) | best peer | peer (ms) | speedup | our error | peer error | our GFLOP/s | our GB/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gf = f"{r['ours_gflops']:.1f}" if r["ours_gflops"] else ""
        gb = f"{r['ours_gbps']:.2f}" if r["ours_gbps"] else ""
        lines.append(
            f"| {r['case']} | {r['ours_ms']:.3f} | {r['peer']} | {r['peer_ms']:.3f} | {r['speedup']:.2f}x "
            f"| {r['ours_rel_error']:.1e} | {r['peer_rel_error']:.1e} | {gf} | {gb} |"
        )
    return "\n".join(lines) + "\n"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RESULTS:
        return
    env = _environment()
    rows = _rows()
    text = _markdown(env, rows)
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console(width=160).print(Markdown(text))
    except ImportError:
        print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if "CPU" not in env["device"] else "cpu"
    stem = RESULTS_DIR / f"latest-{kind}"
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "rows": rows, "raw": [r.__dict__ for r in RESULTS]}, indent=2) + "\n"
    )
    stem.with_suffix(".md").write_text(text)
    print(f"results written to {stem}.json and {stem}.md")


__all__ = ["Result"]
