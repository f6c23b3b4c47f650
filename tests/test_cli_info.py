"""`clisonix-gpu info` with a bad setting: one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys


def test_info_reports_a_bad_backend_setting_in_one_line():
    env = dict(os.environ, CLISONIX_BACKEND="gpu")
    done = subprocess.run([sys.executable, "-m", "clisonix_gpu.cli", "info"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "CLISONIX_BACKEND" in lines[0] and "'gpu'" in lines[0] and "auto" in lines[0]
