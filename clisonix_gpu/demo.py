"""``clisonix-gpu demo``: train small classifiers on datasets that ship with scikit-learn, compress
and binarize them with the LIAM layers, and report accuracy, size and throughput.

Everything is seeded: the same machine gives the same accuracies on every run.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from . import nn as liam_nn

__all__ = ["DemoRow", "fit", "load_dataset", "run_demo", "train_mlp"]


@dataclasses.dataclass
class DemoRow:
    """One model of the demo table; sizes as :func:`clisonix_gpu.nn.model_size` counts them."""

    dataset: str
    variant: str
    accuracy: float
    params: int  # floating-point values
    sign_bits: int  # 1-bit weights of binary layers
    bytes: int
    images_per_hour: float


def load_dataset(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` float32/int64 tensors of 'digits' or 'breast_cancer'."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    loader: Callable[..., Any] = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)

    def as_x(a: Any) -> torch.Tensor:
        return torch.from_numpy(scaler.transform(a).astype(np.float32))

    return as_x(x_train), torch.from_numpy(y_train), as_x(x_test), torch.from_numpy(y_test)


def train_mlp(
    x: torch.Tensor, y: torch.Tensor, hidden: tuple[int, ...] = (256, 256), epochs: int = 150, seed: int = 0, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """An MLP trained full-batch with Adam, deterministically for a given seed."""
    torch.manual_seed(seed)
    sizes = (x.shape[1], *hidden, int(y.max()) + 1)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return fit(nn.Sequential(*layers), x, y, epochs)


ModelT = TypeVar("ModelT", bound=nn.Module)


def fit(model: ModelT, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3) -> ModelT:
    """Full-batch Adam on cross-entropy; returns the model in eval mode."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def images_per_hour(models: list[nn.Module], x: torch.Tensor, rounds: int = 30, calls: int = 10) -> list[float]:
    """Throughput of each of ``models`` on this device for batches ``x`` (the test set), one value
    per model. The models take turns: every round times ``calls`` forwards of each, in an order
    that rotates from round to round, so a slow spell of the machine falls on all of them alike;
    the result is the median over ``rounds``."""
    for model in models:
        model(x)
    seconds: list[list[float]] = [[] for _ in models]
    for turn in range(rounds):
        order = list(range(len(models)))
        order = order[turn % len(order) :] + order[: turn % len(order)]
        for i in order:
            start = time.perf_counter()
            for _ in range(calls):
                models[i](x)
            seconds[i].append((time.perf_counter() - start) / calls)
    return [x.shape[0] / float(np.median(times)) * 3600.0 for times in seconds]


def run_demo(datasets: tuple[str, ...] = ("digits", "breast_cancer"), ranks: tuple[int, ...] = (32, 16, 4),
             tols: tuple[float, ...] = (0.5,), out_dir: Path | None = None) -> list[DemoRow]:  # fmt: skip
    """Train, compress, measure; print a table and, with ``out_dir``, save Markdown and a PNG plot."""
    rows = []
    for name in datasets:
        x_train, y_train, x_test, y_test = load_dataset(name)
        base = train_mlp(x_train, y_train)
        variants: list[tuple[str, nn.Module]] = [("original (nn.Linear)", base)]
        for k in ranks:
            model = copy.deepcopy(base)
            liam_nn.compress(model, k=k)
            variants.append((f"low-rank k={k}", model))
        for tol in tols:
            model = copy.deepcopy(base)
            liam_nn.compress(model, tol=tol)
            variants.append((f"low-rank tol={tol}", model))
        # 1-bit layers binarize their inputs by sign, and ReLU outputs are all >= 0 (all +1):
        # the binary variants start from the same MLP with tanh activations.
        signed = train_mlp(x_train, y_train, activation=nn.Tanh)
        variants.append(("tanh MLP (nn.Linear)", signed))
        model = copy.deepcopy(signed)
        liam_nn.compress(model, binary=True)
        variants.append(("tanh MLP, binary (1-bit)", model))
        model = copy.deepcopy(signed)
        liam_nn.compress(model, binary=True, trainable=True)
        torch.manual_seed(0)
        fit(model, x_train, y_train, epochs=100)  # straight-through fine-tuning of the 1-bit layers
        variants.append(("tanh MLP, binary + 100 STE epochs", model))
        speeds = images_per_hour([candidate for _, candidate in variants], x_test)
        for (variant, candidate), speed in zip(variants, speeds):
            size = liam_nn.model_size(candidate)  # inference state: latent STE weights are not counted
            rows.append(DemoRow(name, variant, accuracy(candidate, x_test, y_test), size.params, size.sign_bits, size.nbytes, speed))
    text = _markdown(rows)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo.md").write_text(text)
        _plot(rows, out_dir / "demo.png")
    return rows


def _markdown(rows: list[DemoRow]) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"# Demo: MLP classifiers compressed with clisonix-gpu ({device}, torch {torch.__version__})",
        "",
        "Sizes are what the model stores for inference: float parameters, 1-bit weights, bytes of both",
        "(the latent float weights that straight-through fine-tuning keeps are training state, not counted).",
        "",
        "| dataset | variant | test accuracy | float parameters | 1-bit weights | bytes | images/hour |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.dataset} | {r.variant} | {r.accuracy:.3f} | {r.params} | {r.sign_bits} | {r.bytes} | {r.images_per_hour:.3g} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[DemoRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r.dataset for r in rows):
        sub = [r for r in rows if r.dataset == name]
        ax.plot([r.bytes for r in sub], [r.accuracy for r in sub], "o", label=name)
        for r in sub:
            ax.annotate(r.variant, (r.bytes, r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("model bytes")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
