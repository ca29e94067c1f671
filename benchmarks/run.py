"""Run the whole benchmark suite: ``python benchmarks/run.py [--quick]``.

Same as ``python -m benchmarks``; see :mod:`benchmarks.suite` for the options. This
file imports nothing heavy at the top: spawned worker processes re-import the main
module, and the memory benchmark needs them free of connshare and msgpack.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.suite import main as suite_main

    return suite_main(argv)


if __name__ == "__main__":
    sys.exit(main())
