"""The README's Python examples run and print what the README shows next to them.

Each ```python block is run in one shared namespace (later examples may use earlier names),
in order, and its printed output must match the plain ``` block that follows it (numbers
compared to the digits shown: the README shows rounded output)."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")


def _examples():
    text = README.read_text(encoding="utf-8")
    pairs = re.findall(r"```python\n(.*?)```\n```\n(.*?)```", text, flags=re.S)
    return [(code, expected) for code, expected in pairs]


def test_the_readme_has_examples_with_output():
    assert len(_examples()) >= 4


def _tokens(text: str):
    return text.split()


def test_readme_examples_print_what_the_readme_shows():
    namespace: dict = {}
    for i, (code, expected) in enumerate(_examples()):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"README example {i}", "exec"), namespace)  # noqa: S102 - our own README
        got, want = _tokens(out.getvalue()), _tokens(expected)
        assert len(got) == len(want), f"example {i}: printed\n{out.getvalue()}\nREADME shows\n{expected}"
        for g, w in zip(got, want):
            if _NUMBER.fullmatch(w.rstrip(",")) and _NUMBER.fullmatch(g.rstrip(",")):
                assert float(g.rstrip(",")) == pytest.approx(float(w.rstrip(",")), rel=1e-9, abs=1e-12), f"example {i}: {g} vs {w}"
            else:
                assert g == w, f"example {i}: {g!r} vs README {w!r}\n{out.getvalue()}"
