"""The README is the short way in: what jacgrad is, install, a quick start, what is supported, a
few examples and links into docs/. Its examples (and those of docs/*.md) are run by
tests/test_docs.py, with the machinery of tests/doc_examples.py."""

import re
import sys

import pytest
from doc_examples import DOCS, README, ROOT, examples
from optional_imports import missing_optional, missing_package

from jacgrad.io.interop import require

MAX_LINES = 350


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; at most {MAX_LINES}: move the rest to docs/"


def test_the_readme_has_examples_and_each_shows_its_output():
    found = examples(README)
    assert len(found) >= 5
    missing = [e.id for e in found if e.expected is None]
    assert not missing, f"README examples without the output they print: {missing}"


def test_the_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_says_how_to_get_the_cpu_build_of_torch():
    text = README.read_text(encoding="utf-8")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_the_internal_fragments_are_gone():
    assert not (DOCS / "readme").exists()


def test_only_a_missing_optional_package_skips_an_example(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # torch made unimportable, as on a machine without it
    assert missing_optional("import numpy as np, torch\nfrom torch import nn") == ["torch"]
    assert missing_optional("import numpy as np\nfrom jacgrad.io.interop.torch_blocks import Residual") == []
    assert missing_optional("import no_such_module_of_jacgrad") == []  # not optional: the example runs and fails
    with pytest.raises(ImportError) as direct:
        import torch  # noqa: F401
    assert missing_package(direct.value) == "torch"
    with pytest.raises(ImportError) as wrapped:  # jacgrad's own message, the ModuleNotFoundError chained
        require("torch", "the check", "pip install torch")
    assert missing_package(wrapped.value) == "torch"
    assert missing_package(ImportError("cannot import name 'x' from 'numpy'", name="numpy")) is None
