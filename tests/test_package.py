"""Packaging and the command line: what a user gets from `pip install`."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import subprocess
import sys
from pathlib import Path

import clisonix_gpu as cg


def test_version_in_one_place():
    from importlib.metadata import version

    assert version("clisonix-gpu") == cg.__version__


def test_kernels_install_as_subpackage():
    files = {p.name for p in importlib.resources.files("clisonix_gpu.kernels").iterdir()}
    assert "transform_matrix.py" in files


def test_cli_info_reports_backends():
    exe = shutil.which("clisonix-gpu") or sys.executable
    cmd = [exe, "info"] if exe != sys.executable else [exe, "-m", "clisonix_gpu.cli", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "numpy   usable" in out
    assert "triton" in out and "cupy" in out and "torch" in out
    assert "CPU transform_matrix" in out and "K=N=1024 float32: MKL packed GEMM" in out and "K=N=1024 float64: BLAS on fixed" in out


def test_ops_do_not_import_torch_library_alda_or_mesh():
    ops_dir = Path(str(importlib.resources.files("clisonix_gpu") / "ops"))
    assert any(ops_dir.glob("*/*.py")), "op packages (ops/<op>/) are checked too"
    for path in ops_dir.rglob("*.py"):
        text = path.read_text()
        for forbidden in ("torch.library", "alda", "mesh", "cli"):
            assert not re.search(rf"^\s*(import {forbidden}\b|from \S*\b{forbidden}\b)", text, re.M), (path, forbidden)


def test_typed_marker_ships():
    assert importlib.resources.files("clisonix_gpu").joinpath("py.typed").is_file()


def test_a_setting_reads_the_environment_at_every_call(monkeypatch):
    """Settings read on every call see ``os.environ`` changes at once, and fall back to
    ``os.environ.get`` where its mapping is not the usual one."""
    import os

    from clisonix_gpu._environ import Setting

    setting = Setting("CLISONIX_TEST_SETTING", "fallback")
    monkeypatch.delenv("CLISONIX_TEST_SETTING", raising=False)
    assert setting.get() == "fallback"
    monkeypatch.setenv("CLISONIX_TEST_SETTING", "é1")
    assert setting.get() == "é1"
    os.environ["CLISONIX_TEST_SETTING"] = "2"
    assert setting.get() == "2"
    monkeypatch.delenv("CLISONIX_TEST_SETTING")
    assert setting.get() == "fallback"
    monkeypatch.setattr(os, "environ", {"CLISONIX_TEST_SETTING": "3"})
    assert setting.get() == "3"
