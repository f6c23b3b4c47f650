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
