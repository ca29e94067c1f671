"""connshare ships its type hints (PEP 561): a user's type checker sees the public
API's types, and connshare, its examples and ``typing_user.py`` (code written as
a user writes it) type-check clean under mypy."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mypy(tmp_path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    # the project's [tool.mypy] settings; a cache of its own: tests run in parallel
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), *files]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_connshare_ships_its_type_hints() -> None:
    assert importlib.resources.files("connshare").joinpath("py.typed").is_file()


def test_the_package_examples_and_user_code_type_check(tmp_path: Path) -> None:
    res = _mypy(tmp_path)  # the files of [tool.mypy]
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_user_s_type_errors_against_the_api_are_caught(tmp_path: Path) -> None:
    # If connshare's types were not seen (no hints, or everything Any), none of
    # these lines would be reported.
    bad = tmp_path / "bad_user.py"
    bad.write_text(
        textwrap.dedent(
            """\
            from connshare import Base, Options, cluster

            class Registry(Base):
                pass

            client = cluster(Registry, name="r").delegate("get").create()
            client.wait_ready("soon")
            flag: str = client.is_leader
            with Registry() as same:
                same.wait_ready(timeout="later")
            Options(port="7777")
            """
        )
    )
    res = _mypy(tmp_path, str(bad))
    assert res.returncode == 1, res.stdout + res.stderr
    flagged = {int(line.split(":")[1]) for line in res.stdout.splitlines() if line.startswith(str(bad)) and ": error:" in line}
    assert flagged == {7, 8, 10, 11}, res.stdout
