"""Every relative link of README.md and docs/*.md resolves: the file (or folder) it names exists in the checkout,
and a `#anchor`, in the same document or another one, is the anchor GitHub gives one of that document's headings.

GitHub's anchors: the heading's text as rendered (no backticks, emphasis or link targets), lower-cased, every
character that is not a letter, digit, `_`, `-` or space removed, each space turned into `-`; the second heading
with the same anchor gets `-1` appended, the third `-2`. Links and headings inside code (fenced blocks, inline
code spans) are not links or headings, and a web address (`https://...`) is not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ *```.*?^ *```[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.M)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def without_code(text: str) -> str:
    """The text with fenced blocks removed and inline code spans blanked (neither holds links or headings)."""
    return _CODE_SPAN.sub("``", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before duplicates are numbered)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor of a markdown document's headings, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(text: str) -> list[str]:
    """The targets of a document's links and images that point inside the checkout (relative, or an #anchor)."""
    return [target for target in _LINK.findall(without_code(text)) if not _EXTERNAL.match(target)]


def broken_links(document: Path) -> list[str]:
    """Each relative link of `document` that does not resolve, with the reason."""
    broken = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path.read_text(encoding="utf-8"))):
            broken.append(f"{target}: no heading of {path.name} has the anchor #{anchor}")
    return broken


def test_slugs_are_githubs():
    """Anchors as GitHub makes them (checked against its rendering of these headings)."""
    assert slug("QLoRA: 4-bit base weights") == "qlora-4-bit-base-weights"
    assert slug("Using the export outside this repository") == "using-the-export-outside-this-repository"
    assert slug("`python -m model.export --checkpoint DIR`") == "python--m-modelexport---checkpoint-dir"
    assert slug("The CLIP feature cache (`data.feature_cache`)") == "the-clip-feature-cache-datafeature_cache"
    assert slug("Correctness, by design and by test") == "correctness-by-design-and-by-test"
    assert slug("图形 and [a link](x.md)") == "图形-and-a-link"
    text = "# Title\n## Options\n```bash\n# not a heading\n```\n## Options\n### Options\n"
    assert anchors(text) == {"title", "options", "options-1", "options-2"}


def test_link_extraction():
    """Links and images outside code are found, web addresses and code are left out (an extraction that finds
    nothing would pass the test below)."""
    text = ("See [the guide](docs/A.md#part), ![a picture](docs/p.png) and [here](#top) or [web](https://x.org).\n"
            "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[a [nested] text](b.md)\n")
    assert relative_links(text) == ["docs/A.md#part", "docs/p.png", "#top", "b.md"]
    readme_links = relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any("#" in link for link in readme_links) and any(link.startswith("docs/") for link in readme_links)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(document):
    assert not broken_links(document), broken_links(document)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """A link to a missing file, to a missing heading, or to the second heading of a name counted wrong fails."""
    (tmp_path / "other.md").write_text("# Same\n## Same\n", encoding="utf-8")
    document = tmp_path / "doc.md"
    document.write_text("# Here\n[a](other.md#same-1) [b](other.md#same-2) [c](missing.md) [d](#there) [e](#here)\n",
                        encoding="utf-8")
    assert [problem.split(":")[0] for problem in broken_links(document)] == ["other.md#same-2", "missing.md", "#there"]
