import os
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
