"""``python -m benchmarks``: the whole suite (see :mod:`benchmarks.suite`)."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # spawned workers import this as __mp_main__: keep it empty
    from benchmarks.suite import main

    sys.exit(main())
