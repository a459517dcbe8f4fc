"""The demos' process pool: jobs run in spawned workers that each build their context once, results come back in
job order, and one process runs them in place."""
from __future__ import annotations

from dataclasses import dataclass

from taillor.demo.pool import run_jobs


@dataclass(frozen=True)
class Settings:
    offset: int = 0
    workers: int = 2


def prepare(settings, log=print):
    import os

    return {"offset": settings.offset, "pid": os.getpid()}


def run(job, ctx):
    name, settings, seed = job
    return {"method": name, "value": seed + ctx["offset"], "pid": ctx["pid"]}


def test_jobs_run_in_workers_in_job_order():
    import os

    jobs = [("full-ft", Settings(), 1), ("frozen", Settings(), 2), ("lora", Settings(), 3)]
    lines = []
    records = run_jobs(jobs, {}, Settings(offset=10), 2, run, prepare, lambda r: r["method"], lines.append)
    assert [r["value"] for r in records] == [11, 12, 13]  # the worker context came from prepare(data_settings)
    assert all(r["pid"] != os.getpid() for r in records)
    assert len(lines) == 3 and lines[-1].startswith("  [3/3]")


def test_one_worker_runs_in_this_process_with_the_given_context():
    records = run_jobs([("frozen", Settings(), 1)], {"offset": 5, "pid": 0}, Settings(), 1, run, prepare, str)
    assert records == [{"method": "frozen", "value": 6, "pid": 0}]
