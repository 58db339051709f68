"""The machinery that runs the Python examples of README.md and docs/*.md.

An example is a ```python block; the plain ``` block right after it, where there is one, is what
it prints. Each example runs on its own — a reader copies one block, not the page — twice: in a
fresh namespace in this process (``__name__ == "__main__"``, as a script sees it), and as a file
``python example.py`` in a subprocess, in an empty temporary folder (so examples that start worker
processes, which re-import ``__main__``, must guard their work with ``if __name__ == "__main__":``).
Printed numbers are compared to the digits shown (the pages show rounded output); every other
token exactly. An example importing an optional package skips where it is not installed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import re
import subprocess
import sys

import pytest
from optional_imports import OPTIONAL, is_installed, missing_package

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_NUMBER = re.compile(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?")
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", flags=re.S | re.M)
_IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)", flags=re.M)


@dataclasses.dataclass(frozen=True)
class Example:
    page: str  # path relative to the repository root
    line: int  # line of the opening fence
    code: str
    expected: str | None  # the output block that follows, if any

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def needs(self) -> list[str]:
        names = set()
        for group in _IMPORT.findall(self.code):
            names.update(part.strip().split(".")[0] for part in group.split(","))
        if ".plot(" in self.code:  # a report's figure: matplotlib, imported by jacgrad
            names.add("matplotlib")
        return sorted(names & (OPTIONAL | {"dask_cuda"}))


def pages() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def examples(path: pathlib.Path) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    fences = list(_FENCE.finditer(text))
    found = []
    for k, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        expected = None
        if k + 1 < len(fences):
            nxt = fences[k + 1]
            if nxt.group(1) == "" and text[m.end():nxt.start()].strip() == "":
                expected = nxt.group(2)
        line = text.count("\n", 0, m.start()) + 1
        found.append(Example(str(path.relative_to(ROOT)), line, m.group(2), expected))
    return found


def all_examples() -> list[Example]:
    return [e for p in pages() for e in examples(p)]


def skip_without_optional(example: Example) -> None:
    for name in example.needs():
        if not is_installed(name):
            pytest.skip(f"{example.id} needs {name}, which is not installed")


def compare(example: Example, printed: str, how: str) -> None:
    if example.expected is None:
        return
    got, want = printed.split(), example.expected.split()
    where = f"{example.id} ({how})"
    assert len(got) == len(want), f"{where}: printed\n{printed}\nthe page shows\n{example.expected}"
    for g, w in zip(got, want):
        if _NUMBER.fullmatch(w.rstrip(",")) and _NUMBER.fullmatch(g.rstrip(",")):
            assert float(g.rstrip(",")) == pytest.approx(float(w.rstrip(",")), rel=1e-9, abs=1e-12), \
                f"{where}: {g} vs {w}\n{printed}"
        else:
            assert g == w, f"{where}: {g!r} vs the page's {w!r}\n{printed}"


def run_in_process(example: Example) -> str:
    """The example in a fresh namespace whose ``__name__`` is ``"__main__"``; returns what it printed.
    The caller sets the working directory (a temporary one: examples may write files)."""
    namespace: dict = {"__name__": "__main__"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(example.code, example.id, "exec"), namespace)  # noqa: S102 - our own pages
    except ImportError as exc:  # jacgrad code it calls needs a peer (jg.distributed: Dask)
        missing = missing_package(exc)
        if missing is None:
            raise
        pytest.skip(f"{example.id} calls into {missing} (not installed): {exc}")
    return out.getvalue()


def run_as_script(example: Example, folder: pathlib.Path, timeout: float = 600) -> str:
    """``python example.py`` in ``folder`` (a subprocess with this environment); returns its stdout."""
    script = folder / "example.py"
    script.write_text(example.code, encoding="utf-8")
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    done = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:  # jacgrad code it calls needs a peer that is not installed: skip, naming it
        for name in re.findall(r"No module named '([\w]+)", done.stderr):
            if name in OPTIONAL and not is_installed(name):
                pytest.skip(f"{example.id} calls into {name} (not installed)")
    assert done.returncode == 0, (f"{example.id}: `python example.py` exited {done.returncode}\n"
                                  f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}")
    return done.stdout


def transcripts(path: pathlib.Path) -> list[tuple[str, int, list[str], str]]:
    """Plain blocks that show a command and its output: the first line ``$ jacgrad ...``, the rest
    what it prints. Returns ``(page, line, argv, expected)``."""
    import shlex

    text = path.read_text(encoding="utf-8")
    found = []
    for m in _FENCE.finditer(text):
        first, _, rest = m.group(2).partition("\n")
        if m.group(1) in ("", "console") and first.startswith("$ jacgrad "):
            found.append((str(path.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1,
                          shlex.split(first[2:])[1:], rest))
    return found


def report_quotes(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """Plain blocks quoting the default ``jacgrad report`` (docs/report-example.txt): the ones that
    start with its summary or a χ̄ line. Returns ``(page, line, block)``."""
    text = path.read_text(encoding="utf-8")
    return [(str(path.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in _FENCE.finditer(text)
            if m.group(1) == "" and m.group(2).startswith(("summary: χ̄", "χ̄ = "))]
