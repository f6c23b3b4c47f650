"""`clisonix-gpu bench`: the harness on toy shapes writes complete results where the user runs it,
the table fits a terminal, and the command says what it needs. This checks the bookkeeping, never
the speed."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clisonix_gpu import __version__, cli
from clisonix_gpu._bench_report import terminal_table

CHECKOUT = Path(__file__).resolve().parent.parent


def _checkout_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", "bench", "README.md"], capture_output=True, text=True, cwd=CHECKOUT).stdout


def test_bench_tiny_writes_every_op_into_the_current_directory(tmp_path, monkeypatch, capfd):
    status = _checkout_status()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--tiny", "--quick", "--device", "cpu"]) == 0
    (json_file,) = (tmp_path / cli.DEFAULT_BENCH_OUT).glob("*-tiny.json")
    for suffix in (".json", ".md", ".png"):
        assert json_file.with_suffix(suffix).stat().st_size > 0
    data = json.loads(json_file.read_text())
    assert {"date", "device", "torch", "commit", "command"} <= set(data["environment"])
    ops = {row["op"] for row in data["rows"]}
    assert {"transform_matrix", "svd_compress", "binary_matmul", "hamming_topk", "alda", "alda.plan", "alda.plan_tasks", "mesh"} <= ops
    for row in data["rows"]:
        assert row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert "ours_rel_error" in row and "peer_rel_error" in row
    assert all(any(r["best_peer"] for r in data["rows"] if r["case"] == case) for case in {r["case"] for r in data["rows"]})
    table = capfd.readouterr().out
    assert "case / peer" in table and max(len(line) for line in table.splitlines()) <= 100
    assert _checkout_status() == status, "a user's run must not write into the source checkout"


def test_terminal_table_of_the_committed_results_fits_100_columns():
    (record, *_) = sorted((CHECKOUT / "bench" / "results").glob("*.json"))
    data = json.loads(record.read_text())
    table = terminal_table(data["environment"], data["rows"])
    assert max(len(line) for line in table.splitlines()) <= 100
    cases = {r["case"] for r in data["rows"]}
    assert sum(line in cases for line in table.splitlines()) == len(cases)  # one whole line per case


def test_bench_rejects_unknown_ops(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--ops", "fft"])
    assert exc.value.code == 2
    assert "unknown ops" in capsys.readouterr().err


def test_bench_without_the_bench_extra_names_the_install_command(monkeypatch, capsys):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--tiny"])
    assert exc.value.code == 2
    assert "pip install 'clisonix-gpu[bench]'" in capsys.readouterr().err


def test_publishing_needs_a_source_checkout_and_a_real_run(tmp_path, monkeypatch, capsys):
    installed = tmp_path / "site-packages" / "clisonix_gpu" / "bench"
    installed.mkdir(parents=True)
    monkeypatch.setattr(cli, "_bench_suite", lambda: installed)
    for flag in ("--publish", "--update-readme"):
        with pytest.raises(SystemExit):
            cli.main(["bench", flag])
        assert "source checkout" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--publish", "--tiny"])
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--publish", "--out", str(tmp_path)])
    assert "not allowed with" in capsys.readouterr().err


def test_version_and_help_texts_are_plain(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"clisonix-gpu {__version__}"
    for command in ([], ["info"], ["bench"], ["demo"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        assert "``" not in capsys.readouterr().out


def test_the_suite_ships_with_the_package_without_the_committed_results(tmp_path):
    """`clisonix_gpu.bench` is the suite (bench/ in a checkout, as kernels/ is clisonix_gpu.kernels)."""
    suite = cli._bench_suite()
    assert {f"bench_{op}.py" for op in cli.BENCH_OPS} <= {p.name for p in suite.iterdir()}
    pytest.importorskip("setuptools")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(CHECKOUT)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("clisonix_gpu/bench/") for n in names if n.startswith("clisonix_gpu/bench/")}
    assert {f"bench_{op}.py" for op in cli.BENCH_OPS} | {"conftest.py", "timing.py", "pytest.ini"} <= shipped
    assert not any(n.startswith("results/") for n in shipped)
