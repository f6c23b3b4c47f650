"""Documentation stays complete and its examples stay true."""

from __future__ import annotations

import doctest
import importlib
import inspect
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


# Examples assume these three imports, as the docs say; everything else they import themselves.
EXAMPLE_GLOBALS = {"np": __import__("numpy"), "torch": __import__("torch"), "cg": __import__("clisonix_gpu")}
# Public names whose example cannot run in a test process, and why.
EXAMPLE_EXEMPT = {"clisonix_gpu.mesh.serve": "the worker loop: it blocks until rank 0 shuts it down"}


def _public_callables() -> list[str]:
    names = []
    for module in DOCUMENTED_MODULES:
        mod = importlib.import_module(module)
        names += [f"{module}.{n}" for n in mod.__all__ if callable(getattr(mod, n)) and not inspect.ismodule(getattr(mod, n))]
    return names


@pytest.mark.parametrize("qualname", _public_callables())
def test_every_public_name_has_a_running_example(qualname):
    module, name = qualname.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), name)
    if qualname in EXAMPLE_EXEMPT:
        assert "Example" in (obj.__doc__ or ""), f"{qualname}: describe the example in words or as a code block"
        pytest.skip(EXAMPLE_EXEMPT[qualname])
    assert ">>>" in (obj.__doc__ or ""), f"{qualname}: its docstring needs an example (>>>)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder(exclude_empty=True).find(obj, name, module=False, globs=dict(EXAMPLE_GLOBALS)):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    "module",
    [
        "clisonix_gpu",
        "clisonix_gpu._dispatch",
        "clisonix_gpu.opset",
        "clisonix_gpu.alda",
        "clisonix_gpu.ops.binary",
        "clisonix_gpu.ops.transform_matrix",
    ],
)
def test_module_docstring_examples_run(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs=EXAMPLE_GLOBALS, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


DOC_PAGES = ["README.md", *(str(page.relative_to(ROOT)) for page in sorted((ROOT / "docs").rglob("*.md")))]
MARKDOWN_WITH_CODE = [p for p in DOC_PAGES if _python_blocks(ROOT / p)]


@pytest.mark.parametrize("path", MARKDOWN_WITH_CODE)
def test_markdown_examples_run(path):
    """Every Python block of a page runs, in page order, in one namespace (as a reader would)."""
    namespace: dict[str, object] = {}
    for block in _python_blocks(ROOT / path):
        exec(compile(block, path, "exec"), namespace)


def test_markdown_pages_with_code_are_found():
    pages = {"README.md", "docs/index.md", "docs/pytorch.md", "docs/alda.md", "docs/mesh.md", "docs/design.md"}
    pages |= {"docs/ops/transform_matrix.md", "docs/ops/svd_compress.md", "docs/ops/binary.md"}
    assert pages <= set(MARKDOWN_WITH_CODE)


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOC_PAGES[1:]:
        assert f": {page.removeprefix('docs/')}\n" in nav, f"add {page} to the nav of mkdocs.yml"


# Paths a reader of the project does not have: the docs point inside the project only.
OUTSIDE_REFERENCES = re.compile(r"/work/|shared folder|\bDESIGN\.md\b|\bANCHORS\.md\b")


def test_no_reference_outside_the_project():
    tracked = [ROOT / p for p in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "mkdocs.yml", "pyproject.toml", "Makefile")]
    tracked += sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "clisonix_gpu").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    found = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in tracked for m in OUTSIDE_REFERENCES.finditer(path.read_text())]
    assert not found, found
