"""The documents: every relative link and #anchor in README.md, docs/ and deploy/README.md resolves, the README stays
a landing page that reaches every page of docs/, and its test command is the one CI runs."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]
README_MAX_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The file's text with fenced code blocks blanked out (a `# comment` there is no heading, `[a](b)` no link)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def anchors(path: Path) -> Iterator[str]:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces as hyphens, and a
    -1, -2, ... suffix on repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(path), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def broken_links(document: Path) -> list[str]:
    broken = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(document):
    broken = broken_links(document)
    assert not broken, f"{document.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_the_link_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# A page: `here`\n\n## Twice\n\n## Twice\n\n[ok](#a-page-here) [ok](#twice-1) [bad](#nowhere)\n"
                    "[ok](other.md#other) [bad](other.md#else) [bad](gone.md) [web](https://example.com)\n"
                    "```\n[in code](nothing.md)\n# not a heading\n```\n", encoding="utf-8")
    assert set(anchors(page)) == {"a-page-here", "twice", "twice-1"}
    assert broken_links(page) == ["#nowhere: no heading with the anchor #nowhere in page.md",
                                  "other.md#else: no heading with the anchor #else in other.md",
                                  "gone.md: no such file"]


def test_readme_is_a_landing_page_that_reaches_every_page_of_docs():
    readme = REPO / "README.md"
    lines = readme.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; reference material goes to docs/"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    pages = set((REPO / "docs").glob("*.md"))
    assert {"jobs.md", "operations.md", "engine.md", "benchmarks.md"} <= {p.name for p in pages}
    assert not {p.resolve() for p in pages} - linked, "every page of docs/ is linked from the README"


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest' in readme
    # quietly, and with the slow tests selected too
    assert re.search(r'^pip install -q -e "\.\[test\]" && pytest( -m "slow or not slow")?( --durations=\d+)?$', ci,
                     re.MULTILINE), ".ci/run runs the README's command 2"
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && wurstfabrik demo" in readme
