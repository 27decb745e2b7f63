"""Every relative link in README.md and docs/*.md resolves: the file or folder exists, and a
``#fragment`` names a heading of the target page (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(markdown: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked (links are not
    links there)."""
    return _CODE.sub("code", _FENCE.sub("", markdown))


def links(markdown: str) -> list[str]:
    """The targets of the inline links and images of a page."""
    return _LINK.findall(prose(markdown))


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to
    hyphens; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken(page: Path, target: str) -> str | None:
    """Why the link ``target`` on ``page`` does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
        return None
    path, _, fragment = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
        return f"{resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved} " \
               "does not exist"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved.read_text()):
        return f"no heading #{fragment} in {resolved.relative_to(REPO)}"
    return None


ALL_LINKS = [(page, target) for page in PAGES for target in links(page.read_text())]


def test_the_pages_have_links():
    assert len(PAGES) >= 6 and len(ALL_LINKS) >= 30


@pytest.mark.parametrize("page, target", ALL_LINKS,
                         ids=[f"{p.relative_to(REPO)}->{t}" for p, t in ALL_LINKS])
def test_relative_link_resolves(page, target):
    assert broken(page, target) is None, f"{page.relative_to(REPO)}: ({target}): " \
                                         f"{broken(page, target)}"


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    page = REPO / "docs" / "service.md"
    # The link this test was written for: the proto, relative to the repository root
    # instead of docs/.
    assert broken(page, "proto/gramstyle/v1/gramstyle.proto") == \
        "docs/proto/gramstyle/v1/gramstyle.proto does not exist"
    assert broken(page, "../proto/gramstyle/v1/gramstyle.proto") is None
    assert broken(page, "#reliability") is None
    assert broken(page, "#no-such-heading") == "no heading #no-such-heading in docs/service.md"
    assert broken(page, "options.md#precision-the-early-stop-the-target-cache") is None
    assert links("see [a](x.md) and ![b](y.png 'title') but not `[c](z.md)`\n"
                 "```\n[d](w.md)\n```\n") == ["x.md", "y.png"]
    assert anchors("# A `b`, c!\n## 4. Calling it\n# A b c\n") == \
        {"a-b-c", "4-calling-it", "a-b-c-1"}
