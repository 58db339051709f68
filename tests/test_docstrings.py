"""Every example in jacgrad's docstrings runs and prints what it says (doctest, one test per
docstring). A docstring whose examples import an optional package this environment lacks, or
call jacgrad code that imports one, is skipped, naming it; so is a module that cannot be imported
without one (jacgrad.io.interop.torch_blocks subclasses torch.nn.Module)."""

import doctest
import importlib
import io
import pkgutil

import pytest
from optional_imports import missing_optional, missing_package

import jacgrad

MODULES = sorted(m.name for m in pkgutil.walk_packages(jacgrad.__path__, "jacgrad.") if not m.name.endswith("__main__"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _import_or_missing(name):
    """(module, None), or (None, the optional package whose absence stops the import)."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        missing = missing_package(exc)
        if missing is None:
            raise
        return None, missing


class _Runner(doctest.DocTestRunner):
    """A doctest runner that also records the missing optional packages its examples raised on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.missing = set()

    def report_unexpected_exception(self, out, test, example, exc_info):
        missing = missing_package(exc_info[1])
        if missing is not None:
            self.missing.add(missing)
        super().report_unexpected_exception(out, test, example, exc_info)


def _cases():
    cases = []
    for name in MODULES:
        module, missing = _import_or_missing(name)
        if module is None:
            cases.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(
                reason=f"{name} imports {missing} (not installed)")))
            continue
        for test in doctest.DocTestFinder().find(module):
            if test.examples:
                cases.append(pytest.param(name, test.name, id=test.name))
    return cases


@pytest.mark.parametrize("module_name, test_name", _cases())
def test_docstring_examples_run(module_name, test_name):
    module = importlib.import_module(module_name)
    (test,) = [t for t in doctest.DocTestFinder().find(module) if t.name == test_name]
    missing = missing_optional("\n".join(e.source for e in test.examples))
    if missing:
        pytest.skip(f"{test_name}'s example needs {', '.join(missing)} (not installed)")
    out = io.StringIO()
    runner = _Runner(optionflags=FLAGS)
    result = runner.run(test, out=out.write)
    if runner.missing:
        pytest.skip(f"{test_name}'s example calls into {', '.join(sorted(runner.missing))} (not installed)")
    assert result.failed == 0, (f"{test_name}: {result.failed} of {result.attempted} docstring examples failed "
                                f"(run pytest --doctest-modules {module_name})\n{out.getvalue()}")
