"""The documentation holds together: every relative link in README.md and docs/*.md points at a file
that exists, and the README stays short enough to read in a few minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 200
# [text](target) and ![alt](target); the target ends at a space (an optional title) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def relative_links(text: str) -> list[str]:
    """The link targets that name a file of the repository (no URL, no in-page anchor), anchors cut."""
    targets = (target.split("#", 1)[0] for target in LINK.findall(text))
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_relative_links_finds_files_and_skips_urls_and_anchors():
    text = ("[a](docs/a.md) ![b](images/b.png \"title\") [c](https://hydra.cc) [d](#results) "
            "[e](runs.md#stopping) [f](mailto:x@y.z)")
    assert relative_links(text) == ["docs/a.md", "images/b.png", "runs.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file(page):
    missing = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t).resolve() for t in relative_links((REPO / "README.md").read_text(encoding="utf-8"))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_the_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
