"""Every example in jacgrad's docstrings runs and prints what it says (doctest, per module)."""

import doctest
import importlib
import pkgutil

import pytest

import jacgrad

MODULES = sorted(m.name for m in pkgutil.walk_packages(jacgrad.__path__, "jacgrad.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (run pytest --doctest-modules {name})"
