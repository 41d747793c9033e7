"""The folder tree is the architecture: imports go one way and never in a circle.

bus -> core -> mechanisms (store, runtime, images, net, host, fs) -> leaves; the
clients (client, cli) see only the D-Bus adapter and the leaves. Every import
counts, including those inside functions, because a late import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import quiltd

ROOT = Path(quiltd.__file__).parent

LEAVES = frozenset({"quiltd", "errors", "model", "paths", "linux", "names", "grammar", "access"})
MECHANISMS = frozenset({"store", "runtime", "images", "net", "host", "fs"})
ALLOWED: dict[str, frozenset[str]] = {
    "bus": frozenset({"core", "dbusnext"}),
    "core": MECHANISMS,
    "store": frozenset(),
    "runtime": MECHANISMS - {"store"},
    "images": MECHANISMS - {"store"},
    "net": MECHANISMS,
    "host": MECHANISMS - {"store"},
    # Safe file handling every other mechanism builds on: it imports leaves only.
    "fs": frozenset(),
    "dbusnext": frozenset(),
    "client": frozenset({"dbusnext"}),
    "cli": frozenset({"client"}),
    "cluster": frozenset({"client"}),
}


def module_name(path: Path) -> str:
    parts = ("quiltd", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The package (or top-level module) a module belongs to: quiltd.core.manager -> core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "quiltd"


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = found.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("quiltd"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quiltd"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        targets.discard(name)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        source = part_of(module)
        for target in targets:
            dest = part_of(target)
            if dest == source or dest in LEAVES or source == "daemon":
                continue
            if source in LEAVES or dest not in ALLOWED.get(source, frozenset()):
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member."""
    found: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_go_one_way() -> None:
    wrong = violations(imports())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert not cycles(imports())


def test_the_checks_catch_a_wrong_way_import_and_a_cycle() -> None:
    graph = {
        "quiltd.runtime.forkserver": {"quiltd.core.manager", "quiltd.linux"},
        "quiltd.client": {"quiltd.bus.names"},
        "quiltd.core.manager": {"quiltd.core.execs"},
        "quiltd.core.execs": {"quiltd.core.manager"},
    }
    assert violations(graph) == ["quiltd.client imports quiltd.bus.names",
                                 "quiltd.runtime.forkserver imports quiltd.core.manager"]
    assert cycles(graph) == [["quiltd.core.execs", "quiltd.core.manager"]]
