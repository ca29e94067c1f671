"""No loop sits where an interrupt could skip connshare's clean-up.

CPython 3.13 and 3.14 can raise a KeyboardInterrupt (Ctrl-C, or
``_thread.interrupt_main()``) on a loop's backward jump without running any
handler of the frame it lands in: not an ``except``, not a ``finally``, not a
``with``'s exit (python/cpython#130279; the exception table leaves that jump out).
A caller that waits in such a loop would keep the connection's read token, or a
lock, for good. So in code that an app's thread runs, a loop inside a ``try``
with a ``finally`` or a catch-all handler, or inside a ``with``, goes in a
function of its own: raised there, the interrupt reaches the handlers of the
caller's frame, which hold. Only the main thread gets these interrupts, and
connshare's loop thread is never the main thread: functions that only it runs
are listed below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import connshare

SRC = Path(connshare.__file__).parent
LOOPS = (ast.While, ast.For, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp)
ONLY_ON_CONNSHARES_LOOP = {
    ("_election.py", "_connect"): "a coroutine that connshare's loop runs",
    ("_leader.py", "data_received"): "the leader's protocol callback",
    ("_node.py", "_lead"): "a coroutine that connshare's loop runs",
    ("_runner.py", "_run_batch"): "the leader's batch of coroutine calls",
}


def _guard(node: ast.AST) -> str | None:
    """What clean-up ``node``'s body is guarded by, if an interrupt could skip it."""
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return "with"
    if isinstance(node, ast.Try):
        if node.finalbody:
            return "try/finally"
        if any(h.type is None or (isinstance(h.type, ast.Name) and h.type.id == "BaseException") for h in node.handlers):
            return "try/except BaseException"
    return None


def _loops_in_guards(node: ast.AST, guard: tuple[str, int] | None, found: list[tuple[int, str]]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue  # a frame of its own
        if guard is not None and isinstance(child, LOOPS):
            found.append((child.lineno, f"{type(child).__name__} inside the {guard[0]} of line {guard[1]}"))
        g = _guard(child)
        if g is None:
            _loops_in_guards(child, guard, found)
            continue
        for stmt in child.body:  # type: ignore[attr-defined]
            _loops_in_guards(ast.Module(body=[stmt], type_ignores=[]), (g, child.lineno), found)
        for part in ("items", "handlers", "orelse", "finalbody"):
            for sub in getattr(child, part, []):
                _loops_in_guards(ast.Module(body=[sub], type_ignores=[]) if isinstance(sub, ast.stmt) else sub, guard, found)


def _offenders_in(tree: ast.AST) -> dict[str, list[tuple[int, str]]]:
    """Per function of ``tree`` that has any: its loops inside a guard."""
    out: dict[str, list[tuple[int, str]]] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found: list[tuple[int, str]] = []
            _loops_in_guards(ast.Module(body=fn.body, type_ignores=[]), None, found)
            if found:
                out[fn.name] = found
    return out


def _offenders() -> dict[tuple[str, str], list[tuple[int, str]]]:
    return {
        (path.name, name): found
        for path in sorted(SRC.glob("*.py"))
        for name, found in _offenders_in(ast.parse(path.read_text(), str(path))).items()
    }


def test_no_loop_where_an_interrupt_could_skip_clean_up() -> None:
    offenders = _offenders()
    bad = {
        f"{f}:{line} {name}: {what}"
        for (f, name), found in offenders.items()
        if (f, name) not in ONLY_ON_CONNSHARES_LOOP
        for line, what in found
    }
    assert not bad, "move each loop to a function of its own:\n" + "\n".join(sorted(bad))
    # the list of exceptions stays true: each still has such a loop
    assert set(ONLY_ON_CONNSHARES_LOOP) <= set(offenders)


def test_the_check_finds_a_loop_in_a_guard() -> None:
    src = (
        "def f(lock, xs):\n    with lock:\n        return [x for x in xs]\n\n"
        "def g(xs):\n    try:\n        for x in xs:\n            pass\n    finally:\n        pass\n"
    )
    assert _offenders_in(ast.parse(src)) == {
        "f": [(3, "ListComp inside the with of line 2")],
        "g": [(7, "For inside the try/finally of line 6")],
    }
