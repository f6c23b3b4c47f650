"""Every CUDA C source in kernels/ compiles for sm_90, so a CUDA C error fails CI even without a GPU."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess

import pytest

CUDA_SOURCES = sorted(p for p in importlib.resources.files("clisonix_gpu.kernels").iterdir() if p.name.endswith(".cu"))


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "kernels/*.cu should ship as package data"


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: CUDA C sources are not compile-checked here")
    result = subprocess.run(
        [nvcc, "-arch=sm_90", "--std=c++17", "--ptx", str(source), "-o", str(tmp_path / "out.ptx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert ".entry" in (tmp_path / "out.ptx").read_text()
