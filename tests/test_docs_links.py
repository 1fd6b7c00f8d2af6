"""Every document the project cites exists: a Markdown file named in the docs, the code or the
tests (``docs/design.md``, ``RELIABILITY.md``, ...) is found next to the citing file, at the
repository root or under docs/."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("*.md", "docs/*.md", "rust/**/*.md", "rust/**/*.rs", "python/**/*.py", "python/**/*.pyi", "tests/**/*.py",
           "tests/**/*.sh", "benchmarks/**/*.py", "fuzz/**/*.py", "tools/**/*.py", "tools/**/*.sh", "Makefile",
           "*.toml")
# a file name ending in .md, not part of a URL
CITED = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")


def test_every_cited_document_exists():
    missing = []
    for pattern in SOURCES:
        for path in REPO.glob(pattern):
            text = path.read_text(encoding="utf-8", errors="replace")
            for name in set(CITED.findall(text)):
                if not any((base / name).exists() for base in (path.parent, REPO, REPO / "docs")):
                    missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, missing
