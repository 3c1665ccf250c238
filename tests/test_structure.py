"""The package's shape: no import circles, no module over 500 lines unless its docstring says why; and no doc
left with a placeholder where a figure belongs.

An import is any ``import`` statement in a module, at module level or inside a function (a lazy
import is still a dependency), except those under ``if TYPE_CHECKING:`` (never run). Module
granularity: ``from . import run`` in ``training/sft.py`` is an edge to ``bezoar_jobs.training.run``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "bezoar_jobs"
MAX_LINES = 500


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    skip.update(id(n) for n in ast.walk(sub))
    return skip


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (see the module docstring)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    top = root.name
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    src = ".".join([*base, node.module] if node.module else base)
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            for t in targets:
                while t and t not in files and "." in t:
                    t = t.rpartition(".")[0]
                if t.split(".")[0] == top and t in files and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_in_the_package():
    found = cycles(import_graph(PKG))
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_the_imports_that_matter():
    g = import_graph(PKG)
    assert "bezoar_jobs.registry" in g["bezoar_jobs.state"]
    assert "bezoar_jobs.training.run" in g["bezoar_jobs.training.sft"]  # from .run import ...
    assert "bezoar_jobs.stages.training" in g["bezoar_jobs.stages.sft"]  # from . import training
    assert "bezoar_jobs.llm.cache" in g["bezoar_jobs.stages.common"]  # a lazy import inside a function


def test_a_circle_is_found(tmp_path):
    """Broken on purpose: a package whose modules import each other, one lazily, one through a
    TYPE_CHECKING block (which does not count)."""
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    found = cycles(import_graph(pkg))
    assert found == [["pkgx.a", "pkgx.sub.b"]]


def _long_modules() -> list[tuple[str, int]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or ""
            if "over 500 lines" not in doc:
                out.append((p.relative_to(REPO).as_posix(), n))
    return out


def test_no_module_over_500_lines_without_a_reason():
    assert _long_modules() == []


@pytest.mark.parametrize("name", ["py.typed"])
def test_the_package_is_typed(name):
    assert (PKG / name).is_file()


def _ctx_params(root: Path) -> list[tuple[str, int, str]]:
    """(file, line, annotation) of every function parameter named ``ctx`` in the package."""
    out = []
    for p in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                    if arg.arg == "ctx":
                        ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                        out.append((p.relative_to(root.parent).as_posix(), node.lineno, ann))
    return out


def test_every_stage_context_is_typed():
    """A stage context is a StageContext, never Any or unannotated (mypy then checks what stages do with it)."""
    params = _ctx_params(PKG)
    assert len(params) > 20  # the check is not vacuous
    bad = [f"{f}:{n}: ctx: {a or '(none)'}" for f, n, a in params if a != "StageContext"]
    assert bad == []


def test_an_untyped_context_is_caught(tmp_path):
    pkg = tmp_path / "pkgy"
    pkg.mkdir()
    (pkg / "m.py").write_text("from typing import Any\ndef f(ctx: Any) -> None: ...\ndef g(ctx): ...\n")
    assert [a for _, _, a in _ctx_params(pkg)] == ["Any", ""]


def test_the_docs_have_no_placeholder_left_for_a_figure():
    """docs/benchmarks.md was left with a literal TABLE2_PLACEHOLDER where a measured table belonged (its text
    pointed the reader to that table): a doc must hold the figure, not a marker for it."""
    import re

    marker = re.compile(r"\b[A-Z0-9_]*PLACEHOLDER[A-Z0-9_]*\b|\bTBD\b|<fill in>")
    found = [f"{p.relative_to(REPO)}:{i}" for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
             for i, line in enumerate(p.read_text().splitlines(), start=1) if marker.search(line)]
    assert not found, found
