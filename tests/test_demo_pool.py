"""The demos' process pool: workers load their own entries once, each job brings the caller's other entries,
results come back in job order, and without a pool the jobs run in this process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from taillor.demo.pool import WorkerPool, run_jobs, worker_pool


@dataclass(frozen=True)
class Settings:
    offset: int = 0
    workers: int = 2


def load(settings):
    return {"offset": settings.offset, "pid": os.getpid()}


def run(job, ctx):
    name, settings, seed = job
    return {"method": name, "value": seed + ctx["offset"] + ctx["bonus"], "pid": ctx["pid"]}


def test_jobs_run_in_workers_in_job_order_with_the_callers_data():
    jobs = [("full-ft", Settings(), 1), ("frozen", Settings(), 2), ("lora", Settings(), 3)]
    lines = []
    with worker_pool(2, len(jobs), load, Settings(offset=10)) as pool:
        assert isinstance(pool, WorkerPool)
        # "offset" and "pid" are the workers' own (from load); "bonus" travels with each job.
        records = run_jobs(jobs, {"offset": -999, "pid": 0, "bonus": 100}, run, lambda r: r["method"],
                           lines.append, pool)
    assert [r["value"] for r in records] == [111, 112, 113]
    assert all(r["pid"] not in (0, os.getpid()) for r in records)
    assert len(lines) == 3 and lines[-1].startswith("  [3/3]")


def test_the_jobs_named_here_run_in_this_process_while_the_workers_run_the_rest():
    import torch

    jobs = [("full-ft", Settings(), 1), ("frozen", Settings(), 2), ("lora", Settings(), 3)]
    lines, threads = [], torch.get_num_threads()
    with worker_pool(2, len(jobs), load, Settings(offset=10)) as pool:
        records = run_jobs(jobs, {"offset": 5, "pid": 0, "bonus": 100}, run, lambda r: r["method"], lines.append,
                           pool, order=("lora",), here=("frozen",))
    assert [(r["method"], r["value"], r["pid"] == 0) for r in records] == [
        ("full-ft", 111, False), ("frozen", 107, True), ("lora", 113, False)]  # frozen: this process's ctx
    assert len(lines) == 3 and lines[0] == "  [1/3] frozen" and torch.get_num_threads() == threads


def test_one_job_or_one_worker_runs_in_this_process_with_the_given_context():
    with worker_pool(2, 1, load, Settings()) as pool:
        assert pool is None
        records = run_jobs([("frozen", Settings(), 1)], {"offset": 5, "pid": 0, "bonus": 0}, run, str, pool=pool)
    assert records == [{"method": "frozen", "value": 6, "pid": 0}]
    with worker_pool(1, 3, load, Settings()) as pool:
        assert pool is None


def test_a_pool_needs_two_workers():
    with pytest.raises(ValueError, match="at least 2 workers, got 1"):
        WorkerPool(1, load, Settings())
