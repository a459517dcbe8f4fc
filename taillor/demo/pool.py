"""Run demo jobs — (method, settings, seed) triples — in worker processes, one torch thread each.

Small models on a CPU use one core poorly with several threads (the matrices are too small to split well), so
two processes with one thread each finish two methods in about the time one process with two threads takes for
one. Each worker prepares the data and the base model once (:func:`taillor.demo.run.prepare`); jobs differ only
in their settings' training fields, never in the data. Workers are started with ``spawn``: forking a process
whose OpenMP pool is running can hang.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Callable, Iterable

from .settings import DemoSettings

__all__ = ["run_jobs"]

_WORKER_CONTEXT: dict = {}
_COST_RANK = {"full-ft": 0, "frozen": 2}


def _init_worker(data_settings: DemoSettings) -> None:
    import warnings

    import torch

    from .run import prepare

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    _WORKER_CONTEXT.update(prepare(data_settings, log=lambda *_: None))


def _run_job(job: tuple[str, DemoSettings, int]) -> dict:
    from .methods import run_method

    name, settings, seed = job
    return run_method(name, _WORKER_CONTEXT, settings, seed, log=lambda *_: None, progress=False)


def run_jobs(jobs: Iterable[tuple[str, DemoSettings, int]], ctx: dict, data_settings: DemoSettings,
             workers: int, log: Callable[[str], None] = print) -> list[dict]:
    """Run every job, in ``workers`` processes when workers > 1 (else here, with ``ctx``); returns the run
    records in job order. ``log`` gets one line per finished job."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        from .methods import run_method

        return [run_method(name, ctx, settings, seed, log) for name, settings, seed in jobs]
    results: list = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(replace(data_settings, workers=1),)) as pool:
        # Longest first (full fine-tuning, then the adapters, the frozen reference last), so that the workers finish
        # together instead of one waiting on a long job submitted last.
        order = sorted(range(len(jobs)), key=lambda i: _COST_RANK.get(jobs[i][0], 1))
        futures = {pool.submit(_run_job, jobs[i]): i for i in order}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            name, _, seed = jobs[i]
            r = results[i]
            log(f"  [{done}/{len(jobs)}] {name:<14} seed {seed}: ACC {r['metrics']['acc']:.3f}  R@1 "
                f"{r['probes']['retrieval_r1'][-1]:.3f}  cos {r['probes']['cosine_to_base'][-1]:.3f}  "
                f"({r['wall_seconds']:.0f}s)")
    return results
