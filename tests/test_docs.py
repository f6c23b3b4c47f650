"""Documentation stays complete and its examples stay true."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_MODULES = ["clisonix_gpu", "clisonix_gpu.torch", "clisonix_gpu.nn", "clisonix_gpu.alda", "clisonix_gpu.mesh"]


def _api_members() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^\s+- (\w+)$", text, flags=re.M))


@pytest.mark.parametrize("module", DOCUMENTED_MODULES)
def test_every_public_name_is_in_the_api_reference(module):
    names = set(importlib.import_module(module).__all__) - {"__version__", "alda", "ops"}
    missing = names - _api_members()
    assert not missing, f"add {sorted(missing)} to docs/api.md"


@pytest.mark.parametrize(
    "module",
    [
        "clisonix_gpu",
        "clisonix_gpu._dispatch",
        "clisonix_gpu.algebra",
        "clisonix_gpu.alda",
        "clisonix_gpu.ops.binary",
        "clisonix_gpu.ops.transform_matrix",
    ],
)
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"np": __import__("numpy")}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _python_blocks(path: Path, marker: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [b for b in blocks if marker in b]


@pytest.mark.parametrize(
    "path,marker",
    [("README.md", "batch-invariant"), ("docs/index.md", "cg.svd_compress(x, k=8)")],
)
def test_self_contained_examples_run(path, marker):
    (block,) = _python_blocks(ROOT / path, marker)
    exec(compile(block, path, "exec"), {})
