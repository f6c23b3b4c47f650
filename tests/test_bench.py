"""`clisonix-gpu bench` on toy shapes: the harness runs every op against its peers and writes
complete results. This checks the bookkeeping, never the speed."""

from __future__ import annotations

import json

from clisonix_gpu import cli


def test_bench_tiny_writes_every_op_with_both_timings_and_errors(tmp_path):
    assert cli.main(["bench", "--tiny", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"latest-cpu.{suffix}").stat().st_size > 0
    data = json.loads((tmp_path / "latest-cpu.json").read_text())
    assert {"date", "device", "torch", "commit", "command"} <= set(data["environment"])
    ops = {row["op"] for row in data["rows"]}
    assert {"transform_matrix", "svd_compress", "binary_matmul", "hamming_topk", "alda", "alda.plan", "alda.plan_tasks", "mesh"} <= ops
    for row in data["rows"]:
        assert row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert "ours_rel_error" in row and "peer_rel_error" in row
    assert all(any(r["best_peer"] for r in data["rows"] if r["case"] == case) for case in {r["case"] for r in data["rows"]})


def test_bench_rejects_unknown_ops(capsys):
    try:
        cli.main(["bench", "--ops", "fft"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unknown ops" in capsys.readouterr().err
