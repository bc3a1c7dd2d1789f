"""Each package imports only the packages below it (declared once, here); no package or bench module in a circle."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("inventory_svc", "payment_svc", "shipping_svc", "notify_svc")

# The layout, bottom up: each package and the project packages it may import. The contracts
# (sagasuite) are at the bottom; svckit is runtime plumbing; the orchestrator and the services are
# the runtime; devstack runs them locally; bench measures them; sagactl, the `saga` command, sits on
# top because its stack commands run devstack and bench, and it knows the orchestrator only through
# its contract (so neither orchestrator nor a service is in its list).
MAY_IMPORT: Mapping[str, frozenset[str]] = {
    "sagasuite": frozenset(),
    "svckit": frozenset({"sagasuite"}),
    "orchestrator": frozenset({"sagasuite", "svckit"}),
    **{service: frozenset({"sagasuite", "svckit"}) for service in SERVICES},
    # devstack.chaos_definitions builds the chaos harness's own saga definition, which the
    # orchestrator process loads (SAGA_DEFINITIONS), with the orchestrator's definition API.
    "devstack": frozenset({"sagasuite", "svckit", "orchestrator"}),
    # The floor and the peers send the order saga's own requests (its compensation reason).
    "bench": frozenset({"sagasuite", "svckit", "orchestrator", "devstack"}),
    # The participant conformance kit checks services against a definition's calls (the definition API).
    "conformance": frozenset({"sagasuite", "svckit", "orchestrator"}),
    "sagactl": frozenset({"sagasuite", "svckit", "devstack", "bench", "conformance"}),
}
# Folders with Python code that ships nothing: anything below may be imported from them.
UNLAYERED = ("tests", "scripts")


def _python_files(package: str) -> Iterator[Path]:
    yield from sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list((path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth (lazy ones included)."""
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:
                yield node.lineno, f"{name}.{alias.name}"


def _project_package(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in MAY_IMPORT or top in UNLAYERED else None


def _circle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_declared_layout_has_no_circle() -> None:
    graph = {package: set(allowed) for package, allowed in MAY_IMPORT.items()}
    assert _circle(graph) is None
    assert all(allowed <= MAY_IMPORT.keys() for allowed in MAY_IMPORT.values())


def test_every_package_imports_only_what_the_layout_allows() -> None:
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        for path in _python_files(package):
            for line, name in _imports(path):
                target = _project_package(name)
                if target and target != package and target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({package} may not import {target})")
    assert not wrong, "imports against the layout:\n" + "\n".join(sorted(set(wrong)))


def test_no_package_imports_another_in_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    for package in MAY_IMPORT:
        for path in _python_files(package):
            for _, name in _imports(path):
                target = _project_package(name)
                if target and target != package:
                    graph.setdefault(package, set()).add(target)
    assert _circle(graph) is None, f"packages import each other in a circle: {' -> '.join(_circle(graph) or [])}"


def test_bench_modules_import_each_other_in_no_circle() -> None:
    """The shared target definitions sit below loadgen, the floor, stats and the peers."""
    paths = list(_python_files("bench"))
    modules = {_module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        source = _module_name(path)
        for _, name in _imports(path):
            if name in modules and name != source and not (ROOT / name.replace(".", "/") / "__init__.py").exists():
                graph.setdefault(source, set()).add(name)
    assert _circle(graph) is None, f"bench modules import each other in a circle: {' -> '.join(_circle(graph) or [])}"


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """Guards the checks themselves: a lazy import inside a function is found, and so is a two-node circle."""
    source = tmp_path / "probe.py"
    source.write_text("def later():\n    from sagactl.render import saga_list\n")
    assert (2, "sagactl.render.saga_list") in set(_imports(source))
    assert _circle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
