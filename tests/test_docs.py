"""The docs hold together: the README stays a short front door, every docs/ page is reachable from
it, and every relative link in the README, docs/ and BENCHMARKS.md points at something that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_PAGES = sorted((ROOT / "docs").glob("*.md"))
LINKING_FILES = [README, ROOT / "BENCHMARKS.md", *DOCS_PAGES]

FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), the target without spaces
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def without_code_blocks(markdown: str) -> str:
    return FENCED_BLOCK.sub("", markdown)


def links_in(file: Path) -> list[str]:
    """The relative link targets of a markdown file: web and mail links are left out."""
    targets = LINK.findall(without_code_blocks(file.read_text()))
    return [t for t in targets if not t.startswith(("http://", "https://", "mailto:"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and spaces kept),
    spaces to hyphens. `(g) FSDP2 training state` -> `g-fsdp2-training-state`."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(file: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(without_code_blocks(file.read_text())):
        base = slug(heading)
        anchor = base if base not in seen else f"{base}-{seen[base]}"
        seen[base] = seen.get(base, 0) + 1
        anchors.add(anchor)
    return anchors


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into a docs/ page"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in links_in(README)}
    missing = [p.name for p in DOCS_PAGES if p.resolve() not in linked]
    assert DOCS_PAGES, "docs/ has no pages"
    assert missing == [], f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("file", LINKING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(file):
    broken = []
    for target in links_in(file):
        path_part, _, anchor = target.partition("#")
        destination = (file.parent / path_part).resolve() if path_part else file
        if not destination.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and destination.suffix == ".md" and anchor not in anchors_of(destination):
            broken.append(f"{target}: {destination.name} has no heading #{anchor}")
    assert broken == [], f"{file.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_slug_follows_githubs_rule():
    assert slug("(g) FSDP2 training state and step time") == "g-fsdp2-training-state-and-step-time"
    assert slug("Sharding the training state (`train.sharding=fsdp`)") == "sharding-the-training-state-trainshardingfsdp"
    assert slug("(c) VAE encode / decode (batch 1)") == "c-vae-encode--decode-batch-1"
