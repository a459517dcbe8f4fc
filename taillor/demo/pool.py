"""Run demo jobs — (method, settings, seed, ...) tuples — in worker processes, one torch thread each.

Small models on a CPU use one core poorly with several threads (the matrices are too small to split well), so
two processes with one thread each finish two methods in about the time one process with two threads takes for
one. A worker loads what lives with the model once, when it starts (the demo's ``load``: model, tokenizer), while
the main process builds the data; each job then brings the main process's data (texts, base measurements), so
no worker builds the data again. Workers are started with ``spawn``: forking a process whose OpenMP pool is
running can hang.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = ["WorkerPool", "worker_pool", "run_jobs"]

Job = tuple  # (method name, settings, seed, ...)
_WORKER_CONTEXT: dict = {}


def _init_worker(load: Callable[[Any], dict], settings) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    torch.set_num_threads(1)
    _WORKER_CONTEXT.update(load(settings))


def _loaded_keys() -> frozenset:
    return frozenset(_WORKER_CONTEXT)


def _run_in_worker(run: Callable, job: Job, shared: dict) -> dict:
    return run(job, {**_WORKER_CONTEXT, **shared})


class WorkerPool:
    """``workers`` spawned processes, started at once; each calls ``load(settings)`` (a module-level function
    returning a dict: what every job needs and each process must hold itself, e.g. the model) when it starts."""

    def __init__(self, workers: int, load: Callable[[Any], dict], settings):
        if workers < 2:
            raise ValueError(f"a WorkerPool needs at least 2 workers, got {workers}")
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(load, settings))
        # One submission per worker starts them all now, so they load while the caller prepares its data.
        self._started = [self._executor.submit(_loaded_keys) for _ in range(workers)]

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def run(self, jobs: list, ctx: dict, run: Callable[[Job, dict], dict], describe: Callable[[dict], str],
            log: Callable[[str], None] = print, order: Optional[Sequence[str]] = None,
            here: Sequence[str] = ()) -> list:
        """``run(job, worker context + ctx)`` for every job; each job carries the entries of ``ctx`` that the
        workers did not load themselves. ``order``: method names in the order their jobs are handed out (the rest
        after them), so that the workers finish together instead of one waiting on a long job handed out last.
        ``here``: methods whose jobs this process runs itself (one torch thread, with ``ctx``) while the workers
        run the rest — a short job that would otherwise run alone at the end while the other core idles."""
        import torch

        loaded = frozenset().union(*(f.result() for f in self._started))
        shared = {k: v for k, v in ctx.items() if k not in loaded}
        results: list = [None] * len(jobs)
        rank = {name: i for i, name in enumerate(order or ())}
        order = sorted(range(len(jobs)), key=lambda i: rank.get(jobs[i][0], len(rank)))
        futures = {self._executor.submit(_run_in_worker, run, jobs[i], shared): i
                   for i in order if jobs[i][0] not in here}
        done = 0

        def finished(i: int) -> None:
            nonlocal done
            done += 1
            log(f"  [{done}/{len(jobs)}] {describe(results[i])}")

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: the same numbers wherever a job runs
        try:
            for i in (i for i in order if jobs[i][0] in here):
                results[i] = run(jobs[i], ctx)
                finished(i)
        finally:
            torch.set_num_threads(threads)
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            finished(i)
        return results


def worker_pool(workers: int, jobs: int, load: Callable[[Any], dict], settings):
    """A :class:`WorkerPool` of ``min(workers, jobs)`` processes, or a context holding None when that is one
    (the jobs then run in the calling process)."""
    n = min(workers, jobs)
    return WorkerPool(n, load, settings) if n > 1 else contextlib.nullcontext(None)


def run_jobs(jobs: Iterable[Job], ctx: dict, run: Callable[[Job, dict], dict], describe: Callable[[dict], str],
             log: Callable[[str], None] = print, pool: Optional[WorkerPool] = None,
             order: Optional[Sequence[str]] = None, here: Sequence[str] = ()) -> list:
    """``run(job, ctx)`` for every job: in ``pool``'s workers when given (handed out in ``order``, the methods in
    ``here`` run by this process meanwhile; see :meth:`WorkerPool.run`), else all here. Returns the records in job
    order; ``log`` gets ``describe(record)`` for each finished job. ``run`` must be a module-level function."""
    jobs = list(jobs)
    if pool is None:
        return [run(job, ctx) for job in jobs]
    return pool.run(jobs, ctx, run, describe, log, order, here)
