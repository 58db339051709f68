"""Every Python example of README.md and docs/*.md runs alone and prints what the page shows next
to it: once in a fresh namespace in this process, and once as a script (``python example.py`` in a
subprocess, in an empty temporary folder). Machinery: tests/doc_examples.py."""

import re

import pytest

from doc_examples import (DOCS, ROOT, Example, all_examples, compare, pages, report_quotes, run_as_script, run_in_process,
                          skip_without_optional, transcripts)

EXAMPLES = all_examples()


def test_every_page_has_examples_where_it_teaches_code():
    pages = {e.page for e in EXAMPLES}
    for name in ("README.md", "docs/networks.md", "docs/importing.md", "docs/parameter-space.md",
                 "docs/gradient-flow.md", "docs/dask.md"):
        assert name in pages, f"{name} has no runnable example"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs_alone_and_prints_what_the_page_shows(example, tmp_path, monkeypatch):
    skip_without_optional(example)
    if "session(workers=" in example.code:
        # its worker processes re-import __main__: what a reader does with it is run the file,
        # which test_example_runs_as_a_script does (a cluster per run costs 10-60 s)
        pytest.skip(f"{example.id} starts a cluster of worker processes: run as a script only")
    monkeypatch.chdir(tmp_path)  # examples may write files: never into the repository
    compare(example, run_in_process(example), "in a fresh namespace")


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs_as_a_script(example, tmp_path):
    skip_without_optional(example)
    compare(example, run_as_script(example, tmp_path), "as a script")


def test_every_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"([\w-]+\.md)", config))
    missing = [p.name for p in DOCS.glob("*.md") if p.name not in listed]
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"


TRANSCRIPTS = [t for p in pages() for t in transcripts(p)]


def test_there_are_command_transcripts():
    assert TRANSCRIPTS, "no `$ jacgrad ...` block found: the tests below would test nothing"


@pytest.mark.parametrize("page,line,argv,expected", TRANSCRIPTS, ids=[f"{t[0]}:{t[1]}" for t in TRANSCRIPTS])
def test_a_command_transcript_prints_what_the_page_shows(page, line, argv, expected, capsys, tmp_path, monkeypatch):
    from jacgrad.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    compare(Example(page, line, " ".join(argv), expected), capsys.readouterr().out, "jacgrad " + " ".join(argv))


QUOTES = [q for p in pages() for q in report_quotes(p)]


@pytest.mark.parametrize("page,line,block", QUOTES, ids=[f"{q[0]}:{q[1]}" for q in QUOTES])
def test_quotes_of_the_default_report_are_in_report_example(page, line, block):
    """What the README and gradient-flow.md quote from `jacgrad report` is in docs/report-example.txt
    (which tests/test_docs_figures.py keeps equal to what the code prints); a line ending in "..."
    is a quoted beginning."""
    example = " ".join((DOCS / "report-example.txt").read_text(encoding="utf-8").split())
    for paragraph in block.split("\n\n"):
        for piece in " ".join(paragraph.split()).split("..."):
            piece = piece.strip()
            if piece and piece != "-":
                assert piece in example, f"{page}:{line}: {piece!r} is not in docs/report-example.txt"


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, as CI runs it: every page in the nav, every link and anchor and
    every `::: module` of the API reference resolves (skipped without the docs extra)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    import os
    import subprocess
    import sys

    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_toy_layer_page_shows_the_example_file():
    """docs/architecture.md shows docs/examples/toy_layer.py whole (the page's block runs as every
    example does): the file and the page never drift apart."""
    toy = (DOCS / "examples" / "toy_layer.py").read_text(encoding="utf-8").rstrip()
    shown = [e.code.rstrip() for e in all_examples() if e.page == "docs/architecture.md"]
    assert toy in shown


def test_the_supported_op_table_in_the_docs_is_the_importers_own():
    """docs/importing.md shows the graph importer's op table as the importer itself prints it."""
    from jacgrad.models.ops import supported_ops_markdown

    page = (ROOT / "docs" / "importing.md").read_text(encoding="utf-8")
    shown = re.search(r"<!-- ops: begin -->\n(.*?)\n<!-- ops: end -->", page, re.S)
    assert shown is not None, "docs/importing.md lost its op-table markers"
    assert shown.group(1).strip() == supported_ops_markdown().strip(), (
        "the op table in docs/importing.md is stale: paste jacgrad.models.ops.supported_ops_markdown()")
