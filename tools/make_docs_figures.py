"""Regenerate the documentation's report output and figures from the code:

    python tools/make_docs_figures.py            # writes into docs/

docs/report-example.txt   the text of `jacgrad report` (the default networks)
docs/gradient-flow.png    its figure (`jacgrad report --plot`)
docs/block-flow.png       the figure of a block report (`jacgrad report --residual 2 --norm layernorm ...`)

tests/test_docs_figures.py runs ``generate`` into a temporary folder and compares the text with
the committed one (and the figures' pixel sizes), so the documents cannot drift from the code."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the block report of docs/gradient-flow.md's "Checking the cure"
BLOCK_ARGS = ["--residual", "2", "--norm", "layernorm", "--activation", "sigmoid", "--depth", "9", "--width", "64",
              "--batch", "16"]


def _report(argv: list[str]) -> str:
    from jacgrad.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["report", *argv])
    if code != 0:
        raise RuntimeError(f"jacgrad report {' '.join(argv)} exited {code}: {err.getvalue()}")
    return out.getvalue()


def generate(folder: os.PathLike) -> dict[str, pathlib.Path]:
    """Write report-example.txt, gradient-flow.png and block-flow.png into ``folder``; returns their paths."""
    folder = pathlib.Path(folder)
    paths = {"text": folder / "report-example.txt", "figure": folder / "gradient-flow.png",
             "blocks": folder / "block-flow.png"}
    paths["text"].write_text(_report(["--plot", str(paths["figure"])]), encoding="utf-8")
    _report([*BLOCK_ARGS, "--plot", str(paths["blocks"])])
    return paths


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for path in generate(ROOT / "docs").values():
        print("wrote", path.relative_to(ROOT))
