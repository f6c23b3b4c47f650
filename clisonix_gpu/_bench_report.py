"""Rendering benchmark results (rows of bench/conftest.py) as a terminal table, Markdown and a PNG
plot; also rewrites the README's performance section from the committed result files."""

from __future__ import annotations

import json
import re
import textwrap
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


def terminal_table(env: dict[str, Any], rows: list[dict[str, object]], width: int = 100) -> str:
    """The results as plain text no wider than ``width``: a line per case, then one indented line
    per peer (fastest first) with both times, the speedup and both errors."""
    numbers = f"{'ours ms':>9} {'peer ms':>9} {'speedup':>8} {'our err':>8} {'peer err':>8}"
    label = width - len(numbers) - 3
    header = f"{env['device']}; {env['date']}; commit {env['commit'] or 'none'}; speedup = peer time / our time (> 1: we are faster)"
    lines = [*textwrap.wrap(header, width), "", f"{'case / peer (fastest first)':<{label + 2}} {numbers}"]
    case = None
    for r in rows:
        if r["case"] != case:
            case = r["case"]
            lines.append(_clip(str(case), width))
        figures = f"{r['ours_ms']:>9.3f} {r['peer_ms']:>9.3f} {r['speedup']:>7.2f}x {r['ours_rel_error']:>8.1e} {r['peer_rel_error']:>8.1e}"
        lines.append(f"  {_clip(str(r['peer']), label):<{label}} {figures}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


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


def newest_results(results: Path) -> list[Path]:
    """The newest result file (``<date>-<device>.json``, toy ``--tiny`` runs left out) per device
    kind in ``results``, CUDA first."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in results.glob("*.json"):
        env = json.loads(path.read_text())["environment"]
        if not env.get("tiny"):
            newest[env["device_kind"]] = max(newest.get(env["device_kind"], ("", path)), (env["date"], path))
    return [newest[kind][1] for kind in ("cuda", "cpu") if kind in newest]


def update_readme(readme: Path, results: Path) -> list[Path]:
    """Replace the README block between the performance markers with the newest result tables
    of :func:`newest_results`; returns the files used."""
    used = newest_results(results)
    parts = []
    for path in used:
        data = json.loads(path.read_text())
        env = data["environment"]
        best = [r for r in data["rows"] if r["best_peer"]]
        parts.append(f"### {env['device']}\n\n{markdown(env, best)}")
    if not parts:
        parts.append("No results yet: run `clisonix-gpu bench --publish` in a source checkout.\n")
    text = readme.read_text()
    block = PERF_BEGIN + "\n" + "\n".join(parts) + PERF_END
    if PERF_BEGIN in text:
        text = re.sub(re.escape(PERF_BEGIN) + ".*?" + re.escape(PERF_END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)
    return used
