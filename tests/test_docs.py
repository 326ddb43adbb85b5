"""The reference pages in docs/ that are generated from the code are up to date and complete."""

from __future__ import annotations

import pathlib

import pytest

from klservice import docs
from tests.server.test_metrics_and_health import scrape

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("name", sorted(docs.PAGES))
def test_generated_page_is_current(name):
    committed = (DOCS / name).read_text()
    assert committed == docs.PAGES[name](), f"docs/{name} is stale: run `make docs` (python -m klservice.docs) and commit it"


def test_metrics_page_names_every_exported_metric(tiny_server):
    families = {name for name, _ in scrape(tiny_server.metrics_url)}
    page = (DOCS / "metrics.md").read_text()
    suffixes = ("_bucket", "_count", "_sum", "_created")
    exported = {name for name in families if name.startswith("klservice_") and not name.endswith(suffixes)}
    assert exported, "the server exports no klservice_ metric"
    missing = sorted(name for name in exported if f"`{name}`" not in page)
    assert not missing, f"docs/metrics.md misses {missing}"


def test_docs_link_to_pages_that_exist():
    import re

    readme = (DOCS.parent / "README.md").read_text()
    for text, base in [(readme, DOCS.parent)] + [(p.read_text(), DOCS) for p in DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), target


def test_the_readme_stays_short():
    """The README is the front page: at most 320 lines; the details live in docs/."""
    lines = (DOCS.parent / "README.md").read_text().splitlines()
    assert len(lines) <= 320, f"README.md has {len(lines)} lines: move details to docs/"
