"""Which tasks an encoder demo run learns, by name, in order (``DemoSettings.tasks``, ``--tasks``)."""

from __future__ import annotations

from typing import Callable

from . import data, data_code
from .data import Task

__all__ = ["TASKS", "DEFAULT_TASKS", "EARLIER_TASKS", "check_task_names", "build_tasks"]

# name -> builder(n_train, n_test, seed) -> Task
TASKS: dict[str, Callable[..., Task]] = {
    "fortunes": data.fortunes_task,
    "language": data.language_task,
    "stdlib": data_code.stdlib_task,
    "first-statement": data_code.first_statement_task,
    "last-statement": data_code.last_statement_task,
}
# Prose first, then two structural code tasks on which a frozen encoder is weak (data_code's docstring).
DEFAULT_TASKS = ("fortunes", "first-statement", "last-statement")
# The sequence of the tables dated before 2026-12-03 evening (docs/results.md), kept reproducible with --tasks.
EARLIER_TASKS = ("fortunes", "language", "stdlib")


def check_task_names(names) -> tuple:
    """``names`` as a tuple if each is a key of :data:`TASKS` and there is at least one; else ValueError."""
    names = tuple(names)
    bad = [name for name in names if name not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown task(s) {bad or 'none given'}; choose from {', '.join(TASKS)}")
    return names


def build_tasks(names=DEFAULT_TASKS, n_train: int = 120, n_test: int = 40, seed: int = 0) -> list[Task]:
    """The tasks ``names`` (keys of :data:`TASKS`), in order; ValueError names an unknown task."""
    return [TASKS[name](n_train, n_test, seed) for name in check_task_names(names)]
