"""jacgrad's imports point one way: backend -> algebra -> networks -> parameter-space products
and diagnostics -> the command, with no import cycle — not even through an import inside a
function (a lazy import is still an edge: it is how a cycle hides).

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from … import`` of a jacgrad module anywhere in a module's body, functions included, except
under ``if TYPE_CHECKING:``. The package root ``jacgrad/__init__.py`` is left out: it is the
façade that re-exports the public names, so it imports everything by design, and
``from jacgrad import __version__`` is not a layering decision.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jacgrad"

# Import cycles that exist on main and are being removed. Each entry is the set of modules of one
# cycle (a strongly connected component of the import graph). A cycle found that is not inside an
# entry fails the test; an entry whose cycle is gone fails it too, so the list only shrinks.
# The lead empties this after merging the fixes.
KNOWN_CYCLES: list[frozenset[str]] = [
]

# ---- layers: begin (tools/regroup.py rewrites this block for the regrouped layout)
# The rank of every subpackage (written by tools/regroup.py from its SUBPACKAGES table): a
# module may import from its own subpackage or a lower one, never a higher one. A module's
# rank is its subpackage's.
RANK: dict[str, int] = {
    "core": 0,
    "elementwise": 1,
    "cuda": 2,
    "algebra": 3,
    "protocol": 4,
    "conv": 5,
    "tokens": 6,
    "nn": 7,
    "io": 8,
    "params": 9,
    "steps": 10,
    "network": 11,
    "models": 12,
    "distributed": 13,
    "flow": 14,
    "cli": 15,
    "bench": 15,
    "examples": 0,  # stays in place
}
LAYER_NAMES = ['core', 'elementwise', 'cuda', 'algebra', 'protocol', 'conv', 'tokens', 'nn', 'io', 'params', 'steps', 'network', 'models', 'distributed', 'flow', 'cli']
COMMAND_MODULES = ['cli.main', 'cli.report', 'cli.check', 'cli.common']
# ---- layers: end


# ---------------------------------------------------------------------------- the graph
def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """``"bench.runner"`` → its file; a package is named by its ``__init__``'s folder."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:  # the root __init__ is the façade, left out (see the module docstring)
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, is_package: bool, node, modules) -> set[str]:
    """The jacgrad modules (names as in ``_modules``) that one import statement loads."""
    found = set()

    def add(dotted: str, names=()):
        if dotted == "":
            base = ""
        elif dotted in modules:
            base = dotted
        else:
            return
        if base:
            found.add(base)
        for n in names:
            sub = f"{base}.{n}" if base else n
            if sub in modules:
                found.add(sub)

    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "jacgrad" or alias.name.startswith("jacgrad."):
                parts = alias.name.split(".")[1:]
                for i in range(1, len(parts) + 1):  # import jacgrad.a.b loads a and a.b
                    add(".".join(parts[:i]))
        return found
    names = [a.name for a in node.names]
    if node.level == 0:
        if node.module == "jacgrad" or (node.module or "").startswith("jacgrad."):
            add(".".join(node.module.split(".")[1:]), names)
        return found
    package = name.split(".") if is_package else name.split(".")[:-1]
    up = node.level - 1
    if up > len(package):
        return found
    base = package[: len(package) - up] if up else package
    dotted = ".".join(base + ([node.module] if node.module else []))
    add(dotted, names)
    return found


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """module → the jacgrad modules it imports (anywhere in its source)."""
    modules = _modules(package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _import_nodes(tree):
            edges |= _targets(name, is_package, node, modules)
        edges.discard(name)
        # a package's own __init__ is run before its submodules: not an edge worth a cycle
        graph[name] = {t for t in edges if not name.startswith(t + ".")}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one module (iterative: no recursion limit)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def a_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through the component, as a path ``[a, b, …, a]`` (breadth-first, shortest)."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {comp}")


def _rank(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        r = RANK.get(".".join(parts[:i]))
        if r is not None:
            return r
    return None


# ---------------------------------------------------------------------------- the tests
def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    # a fake package: a -> b at the top, b -> a inside a function, c -> pkg.d via "from ..",
    # and an import under TYPE_CHECKING that must not count
    pkg = tmp_path / "jacgrad"
    (pkg / "pkg").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import thing\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    import jacgrad.pkg.d\n")
    (pkg / "c.py").write_text("")
    (pkg / "pkg" / "__init__.py").write_text("")
    (pkg / "pkg" / "d.py").write_text("from .. import c\nfrom ..c import x\nfrom . import e\n")
    (pkg / "pkg" / "e.py").write_text("")
    g = import_graph(pkg)
    assert g == {"a": {"b"}, "b": {"a", "pkg", "pkg.d"}, "c": set(), "pkg": set(), "pkg.d": {"c", "pkg.e"}, "pkg.e": set()}
    assert strongly_connected(g) == [{"a", "b"}]
    assert a_cycle(g, {"a", "b"}) == ["a", "b", "a"]


def test_no_import_cycles_beyond_the_known_ones():
    graph = import_graph()
    comps = strongly_connected(graph)
    new = [c for c in comps if not any(c <= known for known in KNOWN_CYCLES)]
    gone = [k for k in KNOWN_CYCLES if not any(len(c & k) > 1 for c in comps)]
    msgs = [" -> ".join(a_cycle(graph, c)) for c in new]
    assert not new, "import cycles: " + "; ".join(msgs) + " (move the shared piece down a layer)"
    assert not gone, f"these known cycles are gone, remove them from KNOWN_CYCLES: {[sorted(k) for k in gone]}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if _rank(m) is None)
    assert not missing, f"add these modules to RANK in {__file__} with their layer: {missing}"


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = [
        f"{a} ({LAYER_NAMES[_rank(a)]}) imports {b} ({LAYER_NAMES[_rank(b)]})"
        for a in sorted(graph) for b in sorted(graph[a])
        if _rank(a) is not None and _rank(b) is not None and _rank(b) > _rank(a)
    ]
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


@pytest.mark.parametrize("cli_module", COMMAND_MODULES)
def test_the_command_modules_form_no_cycle(cli_module):
    # issue 9 item 12: cli <-> _cli_report/_cli_check is untangled (helpers live in _cli_common)
    graph = import_graph()
    assert not any(cli_module in c for c in strongly_connected(graph))
