"""The user's guide: a short README, and every relative link of README.md and docs/ resolves (files and anchors)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PAGES_NAMED = ("tutorial", "studies", "trial-config", "data", "clusters", "evaluations", "erc-loss", "gpu-performance",
               "troubleshooting", "development")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a `# comment` in a code block is no heading
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{target} (no such heading)")
    return out


def test_every_relative_link_resolves():
    broken = {p.relative_to(ROOT).as_posix(): b for p in PAGES if (b := broken_links(p))}
    assert not broken


def test_the_readme_is_a_short_guide_that_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python -m pytest -q" in readme and "ercstudy run search_spaces/quickstart.yaml" in readme
    assert not re.search(r"^#+ Status", readme, re.M)  # measurements live in docs/development.md
    missing = [name for name in PAGES_NAMED if f"docs/{name}.md" not in readme]
    assert not missing


def test_the_checker_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    """A check that cannot fail proves nothing."""
    (tmp_path / "a.md").write_text("# Title here\n[ok](#title-here) [bad](#nope) [gone](b.md) [fine](a.md#title-here)\n")
    assert broken_links(tmp_path / "a.md") == ["#nope (no such heading)", "b.md (no such file)"]
