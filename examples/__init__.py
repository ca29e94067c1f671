"""connshare's examples (run them from the repository root: ``python -m examples...``)."""
