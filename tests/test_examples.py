import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import pick_port

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_shows_one_upstream_connection() -> None:
    env = {**os.environ, "CONNSHARE_PORT": str(pick_port())}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("LEADER") == 1
    assert "the upstream saw 1 connection(s) from 4 workers" in out.stdout
    # The first thing a user runs: its workers leave together, so leaders hand off
    # to followers on their way out too, and none of that may print a traceback or
    # an error (with logging unconfigured, Python prints a record's message alone).
    assert "Traceback" not in out.stderr and "cannot serve" not in out.stderr, out.stderr


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", md.read_text(), re.M)}


def test_relative_links_in_the_docs_reach_a_file_and_heading() -> None:
    docs = [p for p in ROOT.rglob("*.md") if not {"node_modules", ".git"} & set(p.parts) and "egg-info" not in str(p)]
    assert ROOT / "README.md" in docs
    broken = []
    for md in docs:
        for link in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (md.parent / path).resolve() if path else md
            if not target.exists():
                broken.append(f"{md.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{md.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
