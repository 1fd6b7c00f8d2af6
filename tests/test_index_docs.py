"""help(lmcache_rs.Index) documents the class and every method, the stub says the same, and the
examples in the docstring and the README run."""

from __future__ import annotations

import ast
import doctest
import inspect
import re
from pathlib import Path

import lmcache_rs
from lmcache_rs import Index

REPO = Path(__file__).resolve().parent.parent


def _words(text: str | None) -> str:
    return " ".join((text or "").split())


def stub_docs() -> dict[str, str]:
    """Index's docstrings in _core.pyi: "" for the class, then each method's name."""
    tree = ast.parse((REPO / "python" / "lmcache_rs" / "_core.pyi").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Index"]
    out = {"": ast.get_docstring(cls, clean=True) or ""}
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            out[node.name] = ast.get_docstring(node, clean=True) or ""
    return out


def test_help_documents_the_class_and_every_method_as_the_stub_does():
    stub = stub_docs()
    public = sorted(name for name in dir(Index) if not name.startswith("_"))
    assert sorted(n for n in stub if n) == public  # the stub lists every method
    for name in ["", *public]:
        runtime = inspect.getdoc(getattr(Index, name) if name else Index)
        assert runtime, f"Index.{name} has no docstring"
        assert _words(runtime) == _words(stub[name]), f"Index.{name}: the stub's docstring differs from help()'s"
    text = inspect.getdoc(Index) or ""
    assert "lookup" in text and ">>>" in text


def test_the_docstring_example_runs():
    finder = doctest.DocTestFinder(recurse=False)
    (test,) = finder.find(Index, "Index", globs={"Index": Index})
    outcome = doctest.DocTestRunner().run(test)
    assert outcome.attempted >= 3 and outcome.failed == 0


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    (code,) = re.findall(r"## The index from Python.*?```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    ix = scope["ix"]
    assert ix.lookup(list(range(10)) + [99]) == {"inst-a": ("LocalCPUBackend", 8), "inst-b": ("GPU", 8)}
    assert (tmp_path / "index.snap").exists() and lmcache_rs.__version__
