"""Run demo jobs — (method, settings, seed) triples — in worker processes, one torch thread each.

Small models on a CPU use one core poorly with several threads (the matrices are too small to split well), so
two processes with one thread each finish two methods in about the time one process with two threads takes for
one. Each worker prepares the data and the base model once (the demo's ``prepare``); jobs differ only in their
settings' training fields, never in the data. Workers are started with ``spawn``: forking a process whose OpenMP
pool is running can hang.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Any, Callable, Iterable

__all__ = ["run_jobs"]

Job = tuple  # (method name, settings, seed)
_WORKER_CONTEXT: dict = {}
# Longest first (full fine-tuning, then the adapters, the frozen reference last), so that the workers finish
# together instead of one waiting on a long job submitted last.
_COST_RANK = {"full-ft": 0, "frozen": 2}


def _init_worker(prepare: Callable, data_settings) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    torch.set_num_threads(1)
    _WORKER_CONTEXT.update(prepare(data_settings, log=lambda *_: None))


def _run_in_worker(run: Callable, job: Job) -> dict:
    return run(job, _WORKER_CONTEXT)


def run_jobs(jobs: Iterable[Job], ctx: dict, data_settings, workers: int, run: Callable[[Job, dict], dict],
             prepare: Callable[..., dict], describe: Callable[[dict], str],
             log: Callable[[str], None] = print) -> list[Any]:
    """``run(job, ctx)`` for every job, in ``workers`` processes when workers > 1 (each builds its own context
    with ``prepare(data_settings, log=...)``), else here with ``ctx``. Returns the records in job order; ``log``
    gets ``describe(record)`` for each finished job. ``run`` and ``prepare`` must be module-level functions."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        return [run(job, ctx) for job in jobs]
    results: list = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(prepare, replace(data_settings, workers=1))) as pool:
        order = sorted(range(len(jobs)), key=lambda i: _COST_RANK.get(jobs[i][0], 1))
        futures = {pool.submit(_run_in_worker, run, jobs[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            log(f"  [{done}/{len(jobs)}] {describe(results[i])}")
    return results
