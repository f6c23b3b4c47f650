"""The demo's claims, asserted with its fixed seed: compression at a 2x smaller size keeps accuracy,
a too-small rank collapses, and `clisonix-gpu demo` writes its table and plot."""

from __future__ import annotations

import copy

import pytest

from clisonix_gpu import cli
from clisonix_gpu.demo import accuracy, load_dataset, train_mlp
from clisonix_gpu.nn import compress


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_dataset("digits")
    return train_mlp(x_train, y_train), x_test, y_test


def test_rank_32_halves_parameters_and_keeps_accuracy(digits):
    base, x, y = digits
    model = copy.deepcopy(base)
    report = compress(model, k=32)
    assert report.params_before >= 2 * report.params_after
    assert accuracy(model, x, y) >= accuracy(base, x, y) - 0.015


def test_rank_4_collapses(digits):
    base, x, y = digits
    model = copy.deepcopy(base)
    compress(model, k=4)
    assert accuracy(base, x, y) > 0.95 and accuracy(model, x, y) < 0.5


def test_cli_demo_writes_table_and_plot(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "demo.md").read_text()
    assert "digits" in table and "breast_cancer" in table and "binary" in table
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "images/hour" in capsys.readouterr().out
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| digits |")]
    size = {row[1]: (int(row[3]), int(row[4]), int(row[5])) for row in rows}  # float params, 1-bit weights, bytes
    tanh = size["tanh MLP (nn.Linear)"]
    for variant in ("tanh MLP, binary (1-bit)", "tanh MLP, binary + 100 STE epochs"):
        params, bits, nbytes = size[variant]
        assert bits > 0 and params < tanh[0] / 50 and nbytes < tanh[2] / 20, (variant, size[variant], tanh)
    assert size["low-rank k=32"][2] < size["original (nn.Linear)"][2] / 2
