"""docs/report-example.txt and the figures in docs/ are what the code produces now:
tools/make_docs_figures.py regenerates them here, into a temporary folder, and they are compared
with the committed ones (the text token by token, numbers to the digits shown; the figures by
their pixel size, since their pixels depend on the fonts of the machine)."""

import importlib.util
import re

import pytest

from doc_examples import DOCS, ROOT

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _tool():
    spec = importlib.util.spec_from_file_location("make_docs_figures", ROOT / "tools" / "make_docs_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    pytest.importorskip("matplotlib")
    return _tool().generate(tmp_path_factory.mktemp("docs"))


def test_the_report_example_is_what_jacgrad_report_prints(regenerated):
    got = regenerated["text"].read_text(encoding="utf-8").split()
    want = (DOCS / "report-example.txt").read_text(encoding="utf-8").split()
    assert len(got) == len(want), "docs/report-example.txt is stale: run python tools/make_docs_figures.py"
    for g, w in zip(got, want):
        if _NUMBER.fullmatch(w) and _NUMBER.fullmatch(g):
            # the last digit shown may round the other way on another BLAS
            assert float(g) == pytest.approx(float(w), rel=2e-3, abs=1e-300), f"{g} vs {w}: run tools/make_docs_figures.py"
        else:
            assert g == w, f"{g!r} vs the committed {w!r}: run python tools/make_docs_figures.py"


@pytest.mark.parametrize("name", ["figure", "blocks"])
def test_the_figures_are_produced_at_the_committed_size(regenerated, name):
    from PIL import Image

    path = regenerated[name]
    committed = DOCS / path.name
    assert path.stat().st_size > 0 and committed.exists()
    with Image.open(path) as new, Image.open(committed) as old:
        assert new.format == old.format == "PNG"
        assert new.size == old.size, f"{path.name}: {new.size} now, {old.size} committed: run tools/make_docs_figures.py"
