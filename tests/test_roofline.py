"""Roofline prices of the GPU benchmark cases: the arithmetic, the bench report's columns, and the
targets table in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from clisonix_gpu._bench_report import markdown
from clisonix_gpu._roofline import H200_CEILINGS, best_seconds, matmul_ceiling

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_compute_bound_and_memory_bound_prices():
    # 4096^3 bf16: 2 * 4096^3 flops at 790 TFLOP/s; its 100 MB of traffic would take 23 us
    assert best_seconds("bf16_matmul_TFLOPs", 2 * 4096**3, 100.7e6) == pytest.approx(2 * 4096**3 / 790e12)
    # a GEMV-like case is bound by HBM at 4.3 TB/s
    assert best_seconds("bf16_matmul_TFLOPs", 2.1e9, 134.8e6) == pytest.approx(134.8e6 / 4.3e12)
    # measured ceilings replace the defaults
    measured = {"bf16_matmul_TFLOPs": 395.0, "copy_GBps": 2150.0}
    assert best_seconds("bf16_matmul_TFLOPs", 2 * 4096**3, 1.0, measured) == pytest.approx(2 * 2 * 4096**3 / 790e12)
    assert best_seconds("popc_Tops", 1.0, 134.8e6, measured) == pytest.approx(2 * 134.8e6 / 4.3e12)
    assert [matmul_ceiling(d) for d in ("bfloat16", "float16", "float32", "float64")] == [
        "bf16_matmul_TFLOPs", "fp16_matmul_TFLOPs", "fp32_matmul_TFLOPs", "fp64_matmul_TFLOPs"
    ]  # fmt: skip
    assert matmul_ceiling("float32", tf32=True) in H200_CEILINGS


def test_every_bench_file_with_gpu_cases_has_targets():
    roofline = _load("roofline")
    with_gpu_cases = {p.stem for p in BENCH.glob("bench_*.py") if '"cuda"' in p.read_text() and p.stem != "bench_mesh"}
    assert set(roofline.BENCH_MODULES) == with_gpu_cases  # bench_mesh times loopback transfers on the CPU only
    cases = roofline.targets()
    assert len(cases) == len({c[0] for c in cases}) >= 20
    for case, ceiling, ops, nbytes in cases:
        assert ceiling in H200_CEILINGS and ops > 0 and nbytes > 0, case


def test_docs_list_the_current_targets():
    roofline = _load("roofline")
    text = roofline.DOCS.read_text()
    block = re.search(re.escape(roofline.BEGIN) + r"\n(.*?)" + re.escape(roofline.END), text, re.S)
    assert block, "docs/benchmarks.md lacks the roofline block"
    assert block.group(1) == roofline.markdown(), "stale: run `python bench/roofline.py --update-docs`"


def test_gpu_rows_get_the_price_next_to_our_time():
    conftest = _load("conftest")
    timing = sys.modules["timing"]
    ceiling, ops, nbytes = _load("bench_transform_matrix").gpu_work(4096, 4096, 4096, "bfloat16")
    timing.RESULTS[:] = [
        timing.Result("tm 4096", "clisonix", "cuda", 0.5e-3, 0.0, flops=ops, bytes=nbytes, ceiling=ceiling, ops=ops),
        timing.Result("tm 4096", "torch", "cuda", 0.4e-3, 0.0),
        timing.Result("plan", "clisonix", "cpu", 1e-3, 0.0),
        timing.Result("plan", "numpy", "cpu", 1e-3, 0.0),
    ]
    try:
        conftest.CEILINGS.update({"bf16_matmul_TFLOPs": 687.2})
        rows = conftest._rows()
    finally:
        timing.RESULTS.clear()
        conftest.CEILINGS.clear()
    assert rows[0]["best_ms"] == pytest.approx(2 * 4096**3 / 687.2e12 * 1e3)
    assert rows[1]["best_ms"] is None  # CPU rows have no H200 price
    env = {k: "x" for k in ("device", "date", "commit", "python", "numpy", "torch", "triton", "command")}
    page = markdown(env, rows)
    assert "| roofline (ms) | of roofline |" in page
    assert "| 0.200 | 40% |" in page  # 0.2 ms of 0.5 ms
    assert "roofline" not in markdown(env, rows[1:])
