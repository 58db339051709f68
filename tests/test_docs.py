"""Every Python example of README.md and docs/*.md runs alone and prints what the page shows next
to it: once in a fresh namespace in this process, and once as a script (``python example.py`` in a
subprocess, in an empty temporary folder). Machinery: tests/doc_examples.py."""

import re

import pytest

from doc_examples import DOCS, ROOT, all_examples, compare, run_as_script, run_in_process, skip_without_optional

EXAMPLES = all_examples()


def test_every_page_has_examples_where_it_teaches_code():
    pages = {e.page for e in EXAMPLES}
    for name in ("README.md", "docs/networks.md", "docs/importing.md", "docs/parameter-space.md",
                 "docs/gradient-flow.md", "docs/dask.md"):
        assert name in pages, f"{name} has no runnable example"


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example_runs_alone_and_prints_what_the_page_shows(example, tmp_path, monkeypatch):
    skip_without_optional(example)
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
