"""Demo data from the running Python's standard library, parsed with :mod:`ast` (nothing is downloaded).

* ``first-statement`` - what a function does first: the kind of the first statement of its body (docstring
  removed): return, assign, expression, if, raise, try, for. From every stdlib package.
* ``last-statement``  - how a function ends: the kind of the last statement of its body (return, expression, if,
  raise, assign, try), among functions short enough (200 characters of code) for the ending to be in view.
* ``stdlib``          - which of six stdlib packages a function comes from (the earlier sequence's third task).
* :func:`retrieval_pairs` - docstring -> code pairs from the stdlib's top-level modules (no package's), the
  pre-trained skill whose retention the demo measures.

The two statement tasks are structure, not topic: the label sits in one or two tokens of the code, and a frozen
sentence encoder's mean-pooled embedding carries it poorly (linear heads on frozen all-MiniLM-L6-v2: 0.51 and 0.57
after 30 steps; adapting the encoder adds about 0.3 to each), which is what lets the demo tell methods apart. Both
read the same packages: what is learned about how functions end mostly helps, rather than overwrites, what was
learned about how they begin, so the two tasks measure plasticity, and the retrieval probe (docstring -> code, the
kind of text the tasks train on) measures what is kept.
"""

from __future__ import annotations

import ast
import collections
import functools
import glob
import os
import random
import sysconfig
from typing import NamedTuple

from .data import DataUnavailable, RetrievalSet, Task, balanced_split, normalise, unambiguous

__all__ = ["stdlib_dir", "stdlib_packages", "stdlib_task", "statement_pools", "statement_task", "first_statement_task",
           "last_statement_task", "retrieval_pairs", "STDLIB_PACKAGES", "FIRST_STATEMENTS", "LAST_STATEMENTS",
           "STATEMENT_KINDS"]

STDLIB_PACKAGES = ("asyncio", "email", "multiprocessing", "tkinter", "unittest", "xml")
# label -> the ast class of the statement. "expression" is an expression statement (almost always a call).
STATEMENT_KINDS = {"return": ast.Return, "assign": ast.Assign, "expression": ast.Expr, "if": ast.If,
                   "raise": ast.Raise, "try": ast.Try, "for": ast.For}
# The kinds with at least ~100 functions in CPython 3.11's packages (the smallest class caps every class).
FIRST_STATEMENTS = ("return", "assign", "expression", "if", "raise", "try", "for")
LAST_STATEMENTS = ("return", "expression", "if", "raise", "assign", "try")


class Function(NamedTuple):
    """A public function or method of a source file; ``first``/``last``: the ast class names of the first and
    last statement of its body without the docstring."""

    name: str
    doc: str
    code: str  # signature and body without the docstring, whitespace-normalised, at most max_chars
    first: str
    last: str


def stdlib_dir() -> str:
    """The running interpreter's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def _iter_py_files(path: str):
    if os.path.isfile(path):
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "__pycache__", "idle_test"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(root, f)


@functools.lru_cache(maxsize=None)
def _functions(path: str, max_chars: int = 600) -> tuple[Function, ...]:
    """Every public function/method of a file with more than 30 characters of code (cached)."""
    return tuple(_parse_functions(path, max_chars))


def _statements(tree: ast.AST):
    """The statement nodes of ``tree`` in :func:`ast.walk`'s breadth-first order. A ``def`` is always a statement,
    so skipping expressions finds the same functions in the same order, in a fraction of the time."""
    queue = collections.deque([tree])
    while queue:
        node = queue.popleft()
        queue.extend(child for child in ast.iter_child_nodes(node)
                     if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)))
        yield node


def _parse_functions(path: str, max_chars: int):
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        tree = ast.parse(src)
        src_lines = src.splitlines()
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in _statements(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node) or ""
        body = node.body
        if doc and body and isinstance(body[0], ast.Expr):
            body = body[1:]
        if not body:
            continue
        # source lines of the function without its docstring: signature line(s), then the body after it
        lines = src_lines[node.lineno - 1 : node.end_lineno]
        head_end = node.body[0].lineno - node.lineno
        sig = lines[:head_end] if head_end > 0 else lines[:1]
        rest = lines[body[0].lineno - node.lineno :] if head_end > 0 else []
        code = normalise("\n".join(sig + rest))[:max_chars].rstrip()
        if len(code) < 30:
            continue
        yield Function(node.name, doc, code, type(body[0]).__name__, type(body[-1]).__name__)


def stdlib_task(n_train: int = 120, n_test: int = 40, seed: int = 0) -> Task:
    """Which stdlib package a public function comes from (6 balanced classes), docstrings removed."""
    root = stdlib_dir()
    labelled = []
    for i, pkg in enumerate(STDLIB_PACKAGES):
        path = os.path.join(root, pkg)
        if not os.path.isdir(path):
            raise DataUnavailable(f"the standard library at {root} has no package {pkg!r}")
        labelled += [(fn.code, i) for f in _iter_py_files(path) for fn in _functions(f)]
    pools = unambiguous(labelled, len(STDLIB_PACKAGES))
    train, test = balanced_split(pools, n_train, n_test, seed)
    return Task("stdlib", list(STDLIB_PACKAGES), train, test, source=root)


def stdlib_packages(root: str | None = None) -> list[str]:
    """Every package directly in the stdlib folder ``root`` (a folder with ``__init__.py``) but its test suite."""
    root = root or stdlib_dir()
    return sorted(d for d in os.listdir(root)
                  if d != "test" and os.path.isfile(os.path.join(root, d, "__init__.py")))


def statement_pools(position: str, labels, max_chars: int | None = None, root: str | None = None
                    ) -> dict[int, list[str]]:
    """Class index -> the code texts of every stdlib package's functions whose body starts (``position="first"``)
    or ends (``"last"``) with a statement of kind ``labels[index]`` (names of :data:`STATEMENT_KINDS`).

    Texts are the functions' code without docstrings, from every package under ``root`` (default: the running
    Python's stdlib); ``max_chars`` keeps only functions whose code is at most that long; functions of other kinds
    are left out. A text that occurs twice (the same method in two classes) is kept once, and dropped if its
    copies disagree on the label.
    """
    if position not in ("first", "last"):
        raise ValueError(f"position must be 'first' or 'last', got {position!r}")
    bad = [label for label in labels if label not in STATEMENT_KINDS]
    if bad:
        raise ValueError(f"unknown statement kind(s) {bad}; choose from {', '.join(STATEMENT_KINDS)}")
    root = root or stdlib_dir()
    class_of = {STATEMENT_KINDS[label].__name__: i for i, label in enumerate(labels)}
    labelled = ((fn.code, class_of[getattr(fn, position)])
                for pkg in stdlib_packages(root) for path in _iter_py_files(os.path.join(root, pkg))
                for fn in _functions(path)
                if getattr(fn, position) in class_of and (max_chars is None or len(fn.code) <= max_chars))
    return unambiguous(labelled, len(labels))


def statement_task(name: str, position: str, labels, n_train: int = 120, n_test: int = 40, seed: int = 0,
                   max_chars: int | None = None, root: str | None = None) -> Task:
    """Which kind of statement a function starts or ends with: one balanced class per ``labels`` entry, from
    :func:`statement_pools`."""
    root = root or stdlib_dir()
    pools = statement_pools(position, labels, max_chars, root)
    train, test = balanced_split(pools, n_train, n_test, seed)
    return Task(name, list(labels), train, test, source=root)


def first_statement_task(n_train: int = 120, n_test: int = 40, seed: int = 0) -> Task:
    """What a function does first (7 balanced classes, :data:`FIRST_STATEMENTS`); see :func:`statement_task`."""
    return statement_task("first-statement", "first", FIRST_STATEMENTS, n_train, n_test, seed)


def last_statement_task(n_train: int = 120, n_test: int = 40, seed: int = 0) -> Task:
    """How a short function ends (6 balanced classes, :data:`LAST_STATEMENTS`; code of at most 200 characters, so
    that the ending is within the tokens the model reads); see :func:`statement_task`."""
    return statement_task("last-statement", "last", LAST_STATEMENTS, n_train, n_test, seed, max_chars=200)


def retrieval_pairs(n: int = 200, seed: int = 0, min_doc_words: int = 6) -> RetrievalSet:
    """Docstring -> code pairs from the stdlib's top-level modules (``*.py`` directly in the stdlib folder).

    The query is the docstring's first paragraph, the document the function's code without its docstring.
    None of these modules belongs to the ``stdlib`` task's packages. Pairs with duplicated queries or code are
    dropped; ``n`` pairs are sampled with ``seed``.
    """
    root = stdlib_dir()
    pairs, seen_q, seen_c = [], set(), set()
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        mod = os.path.splitext(os.path.basename(path))[0]
        if mod.startswith("_") or mod in ("this", "antigravity"):
            continue
        for fn in _functions(path):
            q = normalise(fn.doc.split("\n\n")[0])
            if len(q.split()) < min_doc_words or q in seen_q or fn.code in seen_c:
                continue
            seen_q.add(q)
            seen_c.add(fn.code)
            pairs.append((f"{mod}.{fn.name}", q, fn.code))
    if len(pairs) < n:
        raise DataUnavailable(f"only {len(pairs)} docstring/code pairs in {root}, {n} requested")
    rng = random.Random(seed)
    pick = sorted(rng.sample(range(len(pairs)), n))
    return RetrievalSet([pairs[i][1] for i in pick], [pairs[i][2] for i in pick], [pairs[i][0] for i in pick])


