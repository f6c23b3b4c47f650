"""Roofline prices of every GPU benchmark case on an H200 with the default ceilings
(clisonix_gpu/_roofline.py): the targets docs/benchmarks.md lists while no GPU run is committed.

``python bench/roofline.py`` prints the table; ``--update-docs`` rewrites its block in
docs/benchmarks.md. A GPU bench run prints the same price, from the ceilings it measures, next to
our time.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from clisonix_gpu._roofline import H200_CEILINGS, best_seconds, ceiling_rate

BEGIN = "<!-- roofline:begin (python bench/roofline.py --update-docs) -->"
END = "<!-- roofline:end -->"
BENCH_MODULES = ["bench_transform_matrix", "bench_svd_compress", "bench_binary", "bench_alda"]  # those with CUDA cases
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def targets() -> list[tuple[str, str, float, float]]:
    """(case, compute ceiling, ops, bytes) of every CUDA case of every benchmark file."""
    return [t for name in BENCH_MODULES for t in importlib.import_module(name).gpu_targets()]


def markdown() -> str:
    ceilings = ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in H200_CEILINGS.items())
    lines = [
        f"Default H200 ceilings: {ceilings}.",
        "",
        "| GPU case | bound by | work | HBM traffic (MB) | H200 best (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for case, ceiling, ops, nbytes in targets():
        compute_s, memory_s = ops / ceiling_rate(ceiling), nbytes / ceiling_rate("copy_GBps")
        bound = ceiling.rsplit("_", 1)[0].replace("_", " ") if compute_s >= memory_s else "HBM bandwidth"
        unit = "G popcounts" if ceiling.startswith("popc") else "GFLOP"
        lines.append(f"| {case} | {bound} | {ops / 1e9:.3g} {unit} | {nbytes / 1e6:,.1f} | {best_seconds(ceiling, ops, nbytes) * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


def update_docs(path: Path = DOCS) -> None:
    text = path.read_text()
    block = f"{BEGIN}\n{markdown()}{END}"
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))


if __name__ == "__main__":
    if "--update-docs" in sys.argv[1:]:
        update_docs()
    else:
        print(markdown(), end="")
