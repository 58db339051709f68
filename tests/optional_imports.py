"""Which optional packages a snippet of example code needs and this environment lacks.

The README's examples and the docstrings' examples import what they use (``import torch``,
``from sklearn.datasets import ...``); an example whose optional package is not installed is
skipped with that package's name, never failed. Only the packages jacgrad treats as optional
count: a missing NumPy, or a misspelt module, still fails the example.
"""

from __future__ import annotations

import ast
import importlib.util

# Top-level import names of the optional packages (the extras, the peers CI adds, the GPU stack).
OPTIONAL = frozenset({
    "torch", "sklearn", "safetensors", "dask", "distributed", "jax", "flax", "matplotlib",
    "backpack", "opacus", "threadpoolctl", "mpmath", "cupy", "cupyx", "einops", "unfoldNd",
})


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source`` (code that does not parse: none)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def is_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that fails to import, or sys.modules[name] = None
        return False


def missing_optional(source: str) -> list[str]:
    """The optional packages ``source`` imports that are not installed, sorted."""
    return sorted(n for n in imported_modules(source) & OPTIONAL if not is_installed(n))


def missing_package(exc: BaseException | None) -> str | None:
    """The optional package, not installed, whose import raised ``exc`` or an exception it chains
    (jacgrad re-raises a missing peer as an ImportError that says what to install); else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError):
            top = (exc.name or "").split(".")[0]
            if top in OPTIONAL and not is_installed(top):
                return top
        exc = exc.__cause__ or exc.__context__
    return None
