"""The package's shape, read from the source with ``ast``: no import cycles between our modules,
and no module using another one's private names.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions: a
cycle hidden behind a lazy import is still two modules that cannot be understood apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "lmcache_rs"
ROOT = "lmcache_rs"


def module_names() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (relative) import in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lmcache_rs modules that ``module`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, is_package, node.level, node.module)
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {name for name in found if name in modules and name != module}


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_of(module: str) -> str:
    return module.rsplit(".", 1)[0]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_lazy_and_type_checking_imports():
    edges = graph()
    assert "lmcache_rs.controller.server" in edges["lmcache_rs.controller"]  # lazy, in __getattr__
    assert "lmcache_rs.wire.report" in edges["lmcache_rs.worker.reporter"]
    assert "lmcache_rs.worker.p2p" in edges["lmcache_rs.worker.worker"]  # from . import p2p


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ re-exports its modules; the modules must not lean on it in turn
    assert cycles(edges) == []


def test_the_store_and_the_report_protocol_import_no_network_or_controller_code():
    edges = graph()
    assert not {m for m in edges["lmcache_rs.worker.store"] if m.startswith(("lmcache_rs.wire", "lmcache_rs.controller"))}
    both_sides = ("lmcache_rs.worker", "lmcache_rs.controller")  # the protocol belongs to neither
    assert {m for m in edges["lmcache_rs.wire.report"] if m.startswith(both_sides)} == set()
    assert "lmcache_rs.controller.monitor" not in edges["lmcache_rs.controller.registry"]


def private_uses(path: Path, module: str, modules: dict[str, Path]) -> list[str]:
    """``from x import _name`` of another module, and ``obj._name`` on anything but self/cls."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and alias.name != "_core":
                    uses.append(f"{path.name}:{node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            uses.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return uses


def test_no_module_uses_another_ones_private_names():
    modules = module_names()
    found = []
    for name, path in sorted(modules.items()):
        if name.startswith((f"{ROOT}.worker", f"{ROOT}.wire", f"{ROOT}.controller.monitor", f"{ROOT}.controller.registry")):
            found += private_uses(path, name, modules)
    assert found == []
