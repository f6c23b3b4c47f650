"""Rendering benchmark results (rows of bench/conftest.py) as Markdown and a PNG plot; also
rewrites the README's performance section from the committed result files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PERF_BEGIN = "<!-- performance:begin (clisonix-gpu bench --update-readme) -->"
PERF_END = "<!-- performance:end -->"


def _fmt(value: object, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(env: dict[str, Any], rows: list[dict[str, object]]) -> str:
    """The results as a Markdown page (also used for the README's performance section). GPU rows
    with a roofline price (``best_ms``) get two more columns: that price and the share of it we reach."""
    ceilings = env.get("ceilings") or {}
    measured = ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in ceilings.items())
    roofline = any(r.get("best_ms") for r in rows)
    lines = [
        f"Device: {env['device']}; {env['date']}; commit {env['commit']}; Python {env['python']}, NumPy {env['numpy']}, "
        f"torch {env['torch']}, Triton {env['triton']}. Command: `{env['command'].strip()}`."
        + (f" Measured ceilings: {measured}." if measured else ""),
        "",
        "Speedup = peer time / our time (> 1: we are faster), medians measured in the same run; one row per peer, "
        "**bold** = the fastest peer. Errors: max |y − ref| / max |ref| against float64, unless the case names another measure."
        + (" Roofline: the least time this device allows the case (clisonix_gpu/_roofline.py); of roofline = roofline / ours." if roofline else ""),
        "",
        "| case | ours (ms) | peer | peer (ms) | speedup | our error | peer error | our GFLOP/s | our GB/s |"
        + (" roofline (ms) | of roofline |" if roofline else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if roofline else ""),
    ]
    for r in rows:
        peer = f"**{r['peer']}**" if r["best_peer"] else str(r["peer"])
        line = (
            f"| {r['case']} | {r['ours_ms']:.3f} | {peer} | {r['peer_ms']:.3f} | {r['speedup']:.2f}x "
            f"| {r['ours_rel_error']:.1e} | {r['peer_rel_error']:.1e} | {_fmt(r['ours_gflops'], '.1f')} | {_fmt(r['ours_gbps'], '.2f')} |"
        )
        if roofline:
            best = r.get("best_ms")
            share = None if best is None else float(best) / float(r["ours_ms"])  # type: ignore[arg-type]
            line += f" {_fmt(best, '.3f')} | {_fmt(share, '.0%')} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    best = [r for r in rows if r["best_peer"]]
    if not best:
        return
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(best) + 1.5))
    labels = [re.sub(r"; error = [^)]*", "", str(r["case"]))[:64] for r in best]
    values = [float(r["speedup"]) for r in best]  # type: ignore[arg-type]
    ax.barh(range(len(best)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(best)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the best peer (log scale; > 1: clisonix-gpu faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, results: Path) -> list[Path]:
    """Replace the README block between the performance markers with the latest result tables
    (``results/latest-cpu.json``, ``results/latest-cuda.json``); returns the files used."""
    used = [p for p in (results / "latest-cuda.json", results / "latest-cpu.json") if p.exists()]
    parts = []
    for path in used:
        data = json.loads(path.read_text())
        env = data["environment"]
        best = [r for r in data["rows"] if r["best_peer"]]
        parts.append(f"### {env['device']}\n\n{markdown(env, best)}")
    if not parts:
        parts.append("No results yet: run `make bench`.\n")
    text = readme.read_text()
    block = PERF_BEGIN + "\n" + "\n".join(parts) + PERF_END
    if PERF_BEGIN in text:
        text = re.sub(re.escape(PERF_BEGIN) + ".*?" + re.escape(PERF_END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)
    return used
