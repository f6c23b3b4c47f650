"""Starting a mesh from the command line: the worker's environment errors, its help, and the
one-command torchrun launch surviving a worker's death."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

WORKER = [sys.executable, "-m", "clisonix_gpu.cli", "worker"]
MESH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def _env(**values):
    env = {k: v for k, v in os.environ.items() if k not in MESH_ENV}
    return {**env, **values}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "RANK is not set"),
        ({"RANK": "abc", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "RANK must be an integer; got 'abc'"),
        ({"RANK": "1", "WORLD_SIZE": "x2", "MASTER_PORT": "29500"}, "WORLD_SIZE must be an integer; got 'x2'"),
        ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "RANK 5 is outside 0..1"),
        ({"RANK": "-1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "RANK -1 is outside 0..1"),
        ({"RANK": "1", "WORLD_SIZE": "1", "MASTER_PORT": "29500"}, "WORLD_SIZE must be at least 2"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_PORT is not set"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "0"}, "MASTER_PORT must be in 1..65535"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "rank 0 is the edge"),
    ],
)
def test_a_bad_worker_environment_is_one_line_and_a_nonzero_status(values, message, monkeypatch, capsys):
    from clisonix_gpu.mesh import worker_main

    for name in MESH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert worker_main() == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("clisonix-gpu worker: "), lines


def test_the_worker_command_without_rank_exits_with_one_line():
    done = subprocess.run(WORKER, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "clisonix-gpu worker: RANK is not set; a worker reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun sets them; see --help)"
    ]


def test_a_worker_without_its_edge_gives_up_with_one_line(monkeypatch, capsys):
    from clisonix_gpu.mesh import worker_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    for name in MESH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CLISONIX_MESH_CONNECT_TIMEOUT="1").items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert worker_main() == 1
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert "clisonix-gpu worker: rank 1: no mesh at 127.0.0.1" in err and "Traceback" not in err


def test_worker_help_lists_the_environment_it_reads():
    done = subprocess.run([*WORKER, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CLISONIX_MESH_CONNECT_TIMEOUT", "--edge", "torchrun"):
        assert name in done.stdout


APP = textwrap.dedent(
    """
    import os, signal, time
    import torch
    from clisonix_gpu import mesh

    m = mesh.connect(timeout=20)  # joins the ranks torchrun started
    x = torch.arange(10.0)
    for _ in range(4):
        assert torch.equal(m.offload("identity", x), x)
    victim = m.status()[0]
    os.kill(victim["pid"], signal.SIGKILL)  # a worker dies: the edge and the other worker carry on
    start = time.monotonic()
    while m.status()[0]["state"] != "dead" and time.monotonic() - start < 5:
        time.sleep(0.02)
    noticed = time.monotonic() - start
    for _ in range(10):
        assert torch.equal(m.offload("identity", x), x)
    rows = m.status()
    print("STATES", [r["state"] for r in rows[:-1]], "LOCAL", rows[-1]["answered"], "NOTICED", round(noticed, 2), flush=True)
    # no close(): the mesh closes at exit and the workers end
    """
)


def test_torchrun_launch_is_one_command_and_the_edge_survives_a_workers_death(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
        "--master-port", str(port), "-m", "clisonix_gpu.cli", "worker", "--edge", str(app),
    ]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("STATES"))
    assert "STATES ['dead', 'up'] LOCAL 0" in line, line
    assert float(line.split("NOTICED")[1]) < 1.0, line
    assert "serving process" in done.stderr and "ended with signal 9" in done.stderr
    assert elapsed < 90, elapsed
