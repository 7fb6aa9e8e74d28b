"""The package's shape: one concept a module, each small enough to read whole and named in
docs/architecture.md, where a newcomer looks for a concept's home."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "lrsearch"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept (at most {MAX_LINES} lines a module): {long}"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = page.split("```text\n", 1)[1].split("```", 1)[0]
    words = set(re.findall(r"[\w.]+", tree))
    missing = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if p.name != "__init__.py"
        # core/'s modules are named without .py on its lines
        and p.name not in words
        and not (p.parent.name == "core" and p.stem in words)
    ]
    assert not missing, f"docs/architecture.md's tree does not name: {missing}"


def test_getting_started_reaches_the_first_study_before_any_advisory():
    """The install, then the first study: the dependency floors and their advisories have a
    page of their own, linked, in the site's navigation."""
    page = (ROOT / "docs" / "index.md").read_text()
    before = page.split("lrsearch run studies/quickstart.toml", 1)[0]
    assert not re.search(r"CVE-|GHSA-|^\|", before, re.MULTILINE), "advisories before the first study"
    assert "(dependencies.md)" in before
    assert "CVE-" in (ROOT / "docs" / "dependencies.md").read_text()
    assert "dependencies.md" in (ROOT / "mkdocs.yml").read_text()
