"""The README's Python examples run and print what the README shows next to them.

Each ```python block runs on its own, in a fresh namespace (a reader copies one block, not the
page), and its printed output must match the plain ``` block that follows it (numbers compared
to the digits shown: the README shows rounded output). A block that imports an optional package
this environment lacks (torch, sklearn, safetensors, Dask, ...), or calls jacgrad code that
imports one (``jg.distributed.open_npy`` imports Dask), is skipped, naming it."""

import contextlib
import io
import pathlib
import re
import sys

import pytest
from optional_imports import missing_optional, missing_package

from jacgrad.interop import require

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")


def _examples():
    text = README.read_text(encoding="utf-8")
    pairs = re.findall(r"```python\n(.*?)```\n```\n(.*?)```", text, flags=re.S)
    return [(code, expected) for code, expected in pairs]


def test_the_readme_has_examples_with_output():
    assert len(_examples()) >= 4


def test_every_python_block_is_followed_by_its_output():
    text = README.read_text(encoding="utf-8")
    assert text.count("```python\n") == len(_examples())


def _tokens(text: str):
    return text.split()


@pytest.mark.parametrize("i", range(len(_examples())))
def test_readme_example_runs_alone_and_prints_what_the_readme_shows(i):
    code, expected = _examples()[i]
    missing = missing_optional(code)
    if missing:
        pytest.skip(f"README example {i} needs {', '.join(missing)} (not installed)")
    namespace: dict = {"__name__": f"readme_example_{i}"}  # fresh: no names from earlier blocks
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README example {i}", "exec"), namespace)  # noqa: S102 - our own README
    except ImportError as exc:
        missing = missing_package(exc)
        if missing is None:
            raise
        pytest.skip(f"README example {i} calls into {missing} (not installed): {exc}")
    got, want = _tokens(out.getvalue()), _tokens(expected)
    assert len(got) == len(want), f"example {i}: printed\n{out.getvalue()}\nREADME shows\n{expected}"
    for g, w in zip(got, want):
        if _NUMBER.fullmatch(w.rstrip(",")) and _NUMBER.fullmatch(g.rstrip(",")):
            assert float(g.rstrip(",")) == pytest.approx(float(w.rstrip(",")), rel=1e-9, abs=1e-12), f"example {i}: {g} vs {w}"
        else:
            assert g == w, f"example {i}: {g!r} vs README {w!r}\n{out.getvalue()}"


def test_only_a_missing_optional_package_skips_an_example(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # torch made unimportable, as on a machine without it
    assert missing_optional("import numpy as np, torch\nfrom torch import nn") == ["torch"]
    assert missing_optional("import numpy as np\nfrom jacgrad.interop.torch_blocks import Residual") == []
    assert missing_optional("import no_such_module_of_jacgrad") == []  # not optional: the example runs and fails
    with pytest.raises(ImportError) as direct:
        import torch  # noqa: F401
    assert missing_package(direct.value) == "torch"
    with pytest.raises(ImportError) as wrapped:  # jacgrad's own message, the ModuleNotFoundError chained
        require("torch", "the check", "pip install torch")
    assert missing_package(wrapped.value) == "torch"
    assert missing_package(ImportError("cannot import name 'x' from 'numpy'", name="numpy")) is None
