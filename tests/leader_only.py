"""Imported only by the process that raises this error (the leader)."""


class LeaderOnlyError(Exception):
    pass
