"""The documentation agrees with the code: the metrics page shows the schema, every page is reachable, no link is dead.

In-process and fast: reads the Markdown files and renders the tables from ``scaling/records/schema.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

from scaling.records import docs as record_docs

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
"""A Markdown link or image: the target is the first group."""


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def relative_links(path: Path) -> list[str]:
    """The link targets in ``path`` that point into the repository (not a URL, not an anchor of the same page)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_metrics_page_holds_the_tables_the_schema_renders():
    page = record_docs.PAGE.read_text()
    assert record_docs.generated_part(page), f"{record_docs.PAGE} lost its markers {record_docs.BEGIN!r}"
    assert record_docs.generated_part(page) == record_docs.render(), (
        "docs/metrics.md differs from scaling/records/schema.py: run python -m scaling.records.docs --write")


def test_a_changed_unit_in_the_schema_changes_the_rendered_table(monkeypatch):
    metric = record_docs.STEP_METRICS[0]
    changed = (type(metric)(metric.key, "ms", metric.meaning), *record_docs.STEP_METRICS[1:])
    monkeypatch.setattr(record_docs, "STEP_METRICS", changed)
    assert f"| `{metric.key}` | ms |" in record_docs.render()
    assert record_docs.generated_part(record_docs.PAGE.read_text()) != record_docs.render()


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in pages() if p.resolve() not in linked]
    assert pages(), "docs/ holds no page"
    assert not missing, f"README.md links no docs page {missing}"


def test_every_relative_link_resolves():
    dead = []
    for path in (README, *pages()):
        for target in relative_links(path):
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve()
            if not resolved.exists():
                dead.append(f"{path.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                dead.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not dead, "dead links:\n" + "\n".join(dead)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown page: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_nothing_points_outside_the_repository():
    files = [README, *pages(), *REPO.glob("scaling/**/*.py"), *REPO.glob("conf/**/*.yaml"), *REPO.glob("slurm/*"),
             *REPO.glob("scripts/*"), *(p for p in REPO.glob("tests/*.py") if p.name != Path(__file__).name)]
    outside = [str(p.relative_to(REPO)) for p in files if p.is_file() and "SPEC" in p.read_text()]
    assert not outside, f"refer to docs/contract.md instead of a file outside the repository: {outside}"
