"""The import graph of gpufn's own code points one way: down the layers, never up, never in a circle.

Layers, bottom to top (docs/architecture.md, "Layers"):

0. **domain**: pure models and policy, no I/O (`gpufn/autoscaling/`, `gpufn/contracts.py`,
   `gpufn/durations.py`, `gpufn/cluster_groups.py`). Deterministic, so workflows may use them.
1. **workflows**: `workflows/`, deterministic workflow code and the data it carries.
2. **adapters**: what touches the world: `activities/` (the backends, registry, watcher) and the shared
   infrastructure modules of `gpufn/` (settings read from the environment, secret sealing with random nonces,
   GPU discovery through NVML, Kubernetes clients and cluster inventory).
3. **entry points**: `api/`, `worker.py`, the `gpufn` CLI and the `make up` supervisor (`gpufn/cli.py`,
   `gpufn/stack.py`), and the benchmarks.

Rules, each checked over every import statement in the code (module level, inside functions, under
`TYPE_CHECKING`, and in `workflow.unsafe.imports_passed_through()` blocks alike):

* a module imports only modules of its own layer or of layers below it;
* the domain layer imports, outside the project, only the standard library's pure modules and pydantic;
* `activities/` is the worker's: of the entry points only `worker.py` (and the benchmarks, which run a
  worker in-process) import it; the API process and the supervisor get what they share with the worker
  from a lower layer;
* no cycles, not even between two modules of one layer;
* every module of the project belongs to exactly one layer (a new package must be placed here);
* the function examples import no gpufn code (a function image carries none).

Violations that exist today and belong to files other engineers are changing are listed in
`KNOWN_VIOLATIONS`, each with the reason it is wrong and the fix. The test fails on any import that breaks a
rule and is not listed, and also on a listed import that is gone: the list only ever shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ("activities", "api", "bench", "gpufn", "workflows")
"""Directories whose Python files are the project's modules (tests/ is not part of the layering)."""
SCRIPTS = ("worker.py",)
PROJECT_ROOTS = (*PACKAGES, "worker")
"""First parts of the dotted names of the project's modules."""

DOMAIN, WORKFLOWS, ADAPTERS, ENTRY = 0, 1, 2, 3
LAYER_NAMES = {DOMAIN: "domain", WORKFLOWS: "workflows", ADAPTERS: "adapters", ENTRY: "entry points"}

LAYER_OF: dict[str, int] = {
    # Pure domain models and policy: no I/O, no clock, no randomness.
    "gpufn": DOMAIN,
    "gpufn.autoscaling": DOMAIN,
    "gpufn.cluster_groups": DOMAIN,
    "gpufn.contracts": DOMAIN,
    "gpufn.durations": DOMAIN,
    "workflows": WORKFLOWS,
    "activities": ADAPTERS,
    # gpufn's infrastructure modules, shared by the worker and the API process.
    "gpufn.inventory": ADAPTERS,  # NVML through ctypes
    "gpufn.isolation_check": ADAPTERS,  # looks at the user id and the commands installed
    "gpufn.kube_inventory": ADAPTERS,  # Kubernetes API clients
    "gpufn.sealing": ADAPTERS,  # random nonces: never inside a workflow
    "gpufn.settings": ADAPTERS,  # reads the environment: never inside a workflow
    "gpufn.telemetry": ADAPTERS,  # serves Prometheus registries over HTTP (API and worker)
    "api": ENTRY,
    "bench": ENTRY,
    "gpufn.cli": ENTRY,
    "gpufn.stack": ENTRY,
    "worker": ENTRY,
}
"""Layer of each module, by the longest dotted prefix listed."""

WORKER_ONLY = "activities"
WORKER_ENTRIES = ("worker", "bench")
"""The entry points that may import activities/: the worker, and the benchmarks, which run whole stacks
in-process (as the tests do)."""

DOMAIN_EXTERNAL_IMPORTS = frozenset(
    {
        "__future__",
        "abc",
        "collections",
        "copy",
        "dataclasses",
        "datetime",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "itertools",
        "math",
        "operator",
        "pydantic",
        "re",
        "typing",
    }
)
"""What the domain layer may import from outside the project: nothing that reads, writes, waits or draws."""

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    # Each entry: (importer, imported) -> why it is wrong and how it goes away. Remove an entry with its
    # import; the test fails while a listed import is still absent from the code.
}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `importer` imports `imported` (a project module, or an outside name)."""

    importer: str
    imported: str
    line: int


def project_modules() -> dict[str, Path]:
    """Return every module of the project, by dotted name."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for script in SCRIPTS:
        modules[Path(script).stem] = ROOT / script
    return modules


def imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Yield each dotted name a module's import statements import, wherever in the file they stand."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                # `from . import x` in a package's __init__ is relative to the package itself.
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno
                yield base, node.lineno


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """Return the project module a dotted import name lands in (the longest known prefix), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def project_imports() -> tuple[list[Import], list[Import]]:
    """Return (edges between project modules, imports of outside names), self-edges dropped."""
    modules = project_modules()
    inner: dict[tuple[str, str], Import] = {}
    outer: list[Import] = []
    for module, path in modules.items():
        for name, line in imported_names(module, path):
            target = resolve(name, modules)
            if target is None:
                if name.split(".")[0] not in PROJECT_ROOTS:
                    outer.append(Import(module, name, line))
            elif target != module:
                inner.setdefault((module, target), Import(module, target, line))
    return list(inner.values()), outer


def layer_of(module: str) -> int | None:
    """Return a module's layer, by the longest listed prefix, or None when it has none."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def in_package(module: str, package: str) -> bool:
    """Return whether `module` is `package` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def rule_breaks(edges: list[Import]) -> dict[tuple[str, str], str]:
    """Return the edges that import upward or into the worker's package, with what each breaks."""
    broken: dict[tuple[str, str], str] = {}
    for edge in edges:
        source, target = layer_of(edge.importer), layer_of(edge.imported)
        assert source is not None and target is not None, "unplaced modules are reported by their own test"
        if target > source:
            broken[(edge.importer, edge.imported)] = (
                f"{edge.importer} (line {edge.line}, {LAYER_NAMES[source]}) imports {edge.imported} "
                f"({LAYER_NAMES[target]}): upward"
            )
        elif (
            source == ENTRY
            and in_package(edge.imported, WORKER_ONLY)
            and not any(in_package(edge.importer, entry) for entry in WORKER_ENTRIES)
        ):
            broken[(edge.importer, edge.imported)] = (
                f"{edge.importer} (line {edge.line}) imports {edge.imported}: only the worker wires "
                f"{WORKER_ONLY}/"
            )
    return broken


def cycles(edges: list[Import], ignored: set[tuple[str, str]]) -> list[list[str]]:
    """Return the import cycles (strongly connected components of more than one module), edges in `ignored`
    left out."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if (edge.importer, edge.imported) not in ignored:
            graph.setdefault(edge.importer, set()).add(edge.imported)
            graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is a few hundred edges
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def imports() -> tuple[list[Import], list[Import]]:
    """The project's import edges and its imports of outside names."""
    return project_imports()


def test_every_module_has_a_layer() -> None:
    """A module no layer claims would escape every other rule."""
    unplaced = sorted(m for m in project_modules() if layer_of(m) is None)
    assert not unplaced, f"place these modules in LAYER_OF: {unplaced}"


def test_no_upward_import(imports: tuple[list[Import], list[Import]]) -> None:
    """Nothing imports a higher layer, and only the worker imports activities/, but for the listed debts."""
    broken = rule_breaks(imports[0])
    new = [reason for edge, reason in sorted(broken.items()) if edge not in KNOWN_VIOLATIONS]
    assert not new, "imports that break the layering:\n" + "\n".join(new)


def test_no_import_cycle(imports: tuple[list[Import], list[Import]]) -> None:
    """No two modules import each other, directly or around a circle, but for the listed debts."""
    found = cycles(imports[0], set(KNOWN_VIOLATIONS))
    assert not found, f"import cycles: {found}"


def test_known_violations_still_exist(imports: tuple[list[Import], list[Import]]) -> None:
    """A listed debt that was paid is taken off the list, so the list never hides a new violation."""
    edges = {(e.importer, e.imported) for e in imports[0]}
    broken = rule_breaks(imports[0])
    in_cycle = {
        (e.importer, e.imported)
        for e in imports[0]
        for component in cycles(imports[0], set())
        if e.importer in component and e.imported in component
    }
    paid = [
        edge
        for edge in KNOWN_VIOLATIONS
        if edge not in edges or (edge not in broken and edge not in in_cycle)
    ]
    assert not paid, f"remove these from KNOWN_VIOLATIONS, they are no longer violations: {paid}"


def test_domain_layer_is_pure(imports: tuple[list[Import], list[Import]]) -> None:
    """The domain layer uses nothing from outside but pure standard modules and pydantic."""
    impure = sorted(
        f"{i.importer} (line {i.line}) imports {i.imported}"
        for i in imports[1]
        if layer_of(i.importer) == DOMAIN and i.imported.split(".")[0] not in DOMAIN_EXTERNAL_IMPORTS
    )
    assert not impure, "the domain layer has no I/O:\n" + "\n".join(impure)


def test_examples_import_no_gpufn_code() -> None:
    """Function examples are what users put in images: they must run without gpufn installed."""
    found = []
    for path in sorted((ROOT / "examples").rglob("*.py")):
        for name, line in imported_names(path.stem, path):
            if name.split(".")[0] in PROJECT_ROOTS:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not found, "\n".join(found)


def test_rules_catch_what_they_claim() -> None:
    """The checks above find an upward import, a worker-only import and a cycle in a made-up graph."""
    made_up = [
        Import("gpufn.autoscaling", "workflows.models", 1),
        Import("api.app", "activities.registry", 2),
        Import("worker", "activities.registry", 3),
        Import("workflows.models", "gpufn.autoscaling", 4),
        Import("api.gateway.gateway", "api.gateway.dispatcher", 5),
        Import("api.gateway.dispatcher", "api.gateway.gateway", 6),
    ]
    assert set(rule_breaks(made_up)) == {
        ("gpufn.autoscaling", "workflows.models"),
        ("api.app", "activities.registry"),
    }
    # The upward import above also closes a circle with the downward one.
    assert sorted(cycles(made_up, set())) == [
        ["api.gateway.dispatcher", "api.gateway.gateway"],
        ["gpufn.autoscaling", "workflows.models"],
    ]
    assert cycles(made_up, {("api.gateway.dispatcher", "api.gateway.gateway")}) == [
        ["gpufn.autoscaling", "workflows.models"]
    ]
