"""Every relative link in README.md and docs/*.md leads somewhere: the file exists and, for
a link into a markdown page, so does the heading its #anchor names (GitHub's slugs). And
every path of this repository and every module of its packages the pages name, in prose
or in code (`chalicelib/engine/policy.py`, `python -m devstack.poller`), exists:
when code moves, the test names each page and mention to update."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
PAGES = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]

# [text](target) and ![alt](target), the target up to the first space or closing paren
# (an optional "title" after it is ignored).
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (code spans, emphasis and link
    targets dropped), lower case, punctuation other than `-` and `_` removed, each space
    a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(page.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        base = slug(heading.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [
        match.group(1)
        for line in prose(page.read_text())
        for match in LINK.finditer(INLINE_CODE.sub("", line))
    ]


# The repository's own top-level folders and packages: names under them must exist.
PACKAGES = ("chalicelib", "devstack", "tests", "bench", "infra", "examples", "maof_client")
TOP = (*PACKAGES, "dashboard", "docs")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./-]*)")
DOTTED = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)")


def repo_paths(text: str) -> list[str]:
    return [match.group(1).rstrip(".") for match in REPO_PATH.finditer(text)]


def missing_module(dotted: str) -> str | None:
    """The first part of `a.b.c` that names no module of ours, if the parts before it are
    a package (after a module, the rest are its attributes: `maof_client.MaofClient`)."""
    parts = dotted.split(".")
    where = PROJECT_DIR
    for index, part in enumerate(parts):
        if (where / part / "__init__.py").exists() or (where / part).is_dir():
            where = where / part
        elif (where / f"{part}.py").exists():
            return None
        else:
            is_attribute = index > 0 and not part.islower()
            return None if is_attribute else ".".join(parts[: index + 1])
    return None


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_DIR)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for target in filter(relative, links(page)):
        path, _, anchor = target.partition("#")
        destination = (page.parent / unquote(path)).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination.relative_to(PROJECT_DIR)}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    assert not broken, f"{page.relative_to(PROJECT_DIR)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_DIR)))
def test_every_repository_path_and_module_named_exists(page: Path) -> None:
    text = page.read_text()
    gone = [path for path in repo_paths(text) if not (PROJECT_DIR / path).exists()]
    gone += [
        module
        for match in DOTTED.finditer(text)
        if (module := missing_module(match.group(1).rstrip("."))) is not None
    ]
    assert not gone, f"{page.relative_to(PROJECT_DIR)} names what is not here: {sorted(set(gone))}"


def test_the_path_check_tells_moved_code_from_attributes() -> None:
    assert repo_paths("see `chalicelib/engine/policy.py`, then tests/unit.") == [
        "chalicelib/engine/policy.py",
        "tests/unit",
    ]
    assert missing_module("chalicelib.engine.policy") is None
    assert missing_module("devstack.dashboard.upload_site") is None  # a function
    assert missing_module("chalicelib.local.poller") == "chalicelib.local"  # moved away
    assert missing_module("maof_client.MaofClient") is None  # a class of the package
    assert missing_module("chalicelib.nowhere.poller") == "chalicelib.nowhere"
    assert missing_module("examples.agents.nowhere") == "examples.agents.nowhere"


def test_the_link_check_reads_links_and_headings_as_github_does(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# MAOF — Multi-Agent Orchestration\n"
        "## What `make dev` shows\n"
        "## Verifying a run's audit trail\n"
        "## Notes\n## Notes\n"
        "See [a](other.md#x), ![b](img.png), `[not](a-link.md)` and [c](https://e.com).\n"
        "```\n[inside](code.md)\n```\n"
    )
    assert anchors(page) == {
        "maof--multi-agent-orchestration",
        "what-make-dev-shows",
        "verifying-a-runs-audit-trail",
        "notes",
        "notes-1",
    }
    assert links(page) == ["other.md#x", "img.png", "https://e.com"]
    assert [t for t in links(page) if relative(t)] == ["other.md#x", "img.png"]


def test_the_documentation_pages_are_all_checked() -> None:
    names = {page.name for page in PAGES}
    assert {"README.md", "architecture.md", "api.md", "security-ssrf.md"} <= names
