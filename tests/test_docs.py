"""The documents: every one the project cites exists, and the README's commands wait on what the
programs show."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("*.md", "docs/*.md", "rust/**/*.md", "rust/**/*.rs", "python/**/*.py", "python/**/*.pyi", "tests/**/*.py",
           "tests/**/*.sh", "benchmarks/**/*.py", "fuzz/**/*.py", "tools/**/*.py", "tools/**/*.sh", "Makefile",
           "*.toml")
# a file name ending in .md, not part of a URL
CITED = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w-]+/)*[\w-]+\.md)\b")


def test_every_cited_document_exists():
    """A Markdown file named in the docs, the code or the tests (``docs/design.md``, ...) is found
    next to the citing file, at the repository root or under docs/."""
    missing = []
    for pattern in SOURCES:
        for path in REPO.glob(pattern):
            text = path.read_text(encoding="utf-8", errors="replace")
            for name in set(CITED.findall(text)):
                if not any((base / name).exists() for base in (path.parent, REPO, REPO / "docs")):
                    missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, missing


def test_the_readme_lookup_by_hand_waits_on_what_metrics_shows():
    """The README's by-hand lookup waits until /metrics shows the worker's chunks (no fixed
    sleep): its condition is false before a worker reports and true after."""
    from fake_worker import ControllerProcess, FakeWorker, HttpClient, run_with_workers

    block = (REPO / "README.md").read_text().split("## The lookup, by hand", 1)[1].split("```bash", 1)[1]
    block = block.split("```", 1)[0]
    assert not re.search(r"^\s*sleep ", block, re.M), block
    (condition,) = re.findall(r"^until curl -s http://localhost:9000/metrics \| grep -q '([^']+)'; do sleep", block,
                              re.M)
    tokens = json.loads(re.search(r"echo '(\[[\d, ]+\])' > prompts.jsonl", block).group(1))
    with ControllerProcess(config={"chunk_size": 256}) as proc:

        async def main():
            async with HttpClient("127.0.0.1", proc.http_port) as http:
                _, _, before = await http.request("GET", "/metrics")
                fw = FakeWorker("lmcache_default_instance", 0, proc.monitor_port)
                await fw.start()
                fw.admit_tokens("LocalCPUBackend", tokens)
                await fw.barrier()
                _, _, after = await http.request("GET", "/metrics")
                await fw.close()
            return before.decode(), after.decode()

        before, after = run_with_workers(main())
    assert not re.search(condition, before, re.M) and re.search(condition, after, re.M)
