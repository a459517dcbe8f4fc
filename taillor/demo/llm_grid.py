"""``taillor demo --model smollm2 --lr-grid``: each method over its learning-rate grid (``LR_GRIDS``, three rates
for every method), one seed, and the rate with the lowest final mean NLL over the tasks (the continual-learning
ACC in nats: what was learned and kept) chosen per method.

Writes ``lr-grid.json`` and ``lr-grid.md`` (the table) to the output folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace

from .llm_methods import COST_ORDER, LABELS, LR_GRIDS

__all__ = ["grid_settings", "run_lr_grid", "choose", "format_grid"]


def grid_settings(settings, method: str, lr: float):
    """``settings`` with ``method``'s learning rate set to ``lr`` (the field that method reads)."""
    if method not in LR_GRIDS:
        raise ValueError(f"lr grid: no grid for method {method!r}; choose from {', '.join(LR_GRIDS)}")
    if method == "full-ft":
        return replace(settings, lr_full=lr)
    peer_lrs = dict(settings.peer_lrs)
    if method in peer_lrs:
        peer_lrs[method] = lr
        return replace(settings, peer_lrs=tuple(peer_lrs.items()))
    return replace(settings, lr=lr)


def choose(rows: list[dict]) -> dict:
    """Per method, the learning rate of its row with the lowest final mean NLL."""
    best = {}
    for row in rows:
        if row["method"] not in best or row["final_mean_nll"] < best[row["method"]]["final_mean_nll"]:
            best[row["method"]] = row
    return {m: r["lr"] for m, r in best.items()}


def format_grid(rows: list[dict]) -> str:
    """A markdown table: one row per (method, lr), the chosen rate of each method marked."""
    chosen = choose(rows)
    lines = ["| method | lr | plasticity | German after code | English | final mean NLL | s | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['lr']:g} | {r['plasticity']:+.1%} | "
                     f"{r['first_task_change']:+.1%} | {r['english_change']:+.1%} | {r['final_mean_nll']:.4f} | "
                     f"{r['wall_seconds']:.0f} | {'✓' if chosen[r['method']] == r['lr'] else ''} |")
    return "\n".join(lines)


def run_lr_grid(settings, methods, out_dir: str, log=print) -> dict:
    """Every rate of every method in ``methods`` for one seed (seed 0) under ``settings``; writes lr-grid.json and
    lr-grid.md to ``out_dir`` and returns the JSON document."""
    import torch

    from .llm import build_frames_once, describe, load_base, prepare, run_job
    from .llm_model import converted_model_dir
    from .pool import run_jobs, worker_pool

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    settings = replace(settings, seeds=1, methods=tuple(methods), frame_cache_dir=os.path.join(out_dir, "frames"))
    points = [(m, lr) for m in methods for lr in LR_GRIDS[m]]
    jobs = [(m, grid_settings(settings, m, lr), 0, out_dir) for m, lr in points]
    converted_model_dir(log=log)
    with worker_pool(settings.workers, len(jobs), load_base, settings) as pool:
        ctx = prepare(settings, log)
        build_frames_once(ctx["model"], settings, log)
        log(f"lr grid: {len(points)} runs ({', '.join(methods)}) on {settings.workers} worker(s)")
        runs = run_jobs(jobs, ctx, run_job, describe, log, pool, COST_ORDER)
    for scratch in ("work", "frames"):
        shutil.rmtree(os.path.join(out_dir, scratch), ignore_errors=True)
    rows = [{"method": m, "lr": lr, "wall_seconds": r["wall_seconds"], **r["metrics"]}
            for (m, lr), r in zip(points, runs)]
    table = format_grid(rows)
    results = {"settings": asdict(settings), "rows": rows, "chosen": choose(rows), "runs": runs,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "wall_seconds": time.perf_counter() - t0}
    with open(os.path.join(out_dir, "lr-grid.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "lr-grid.md"), "w") as f:
        f.write(table + "\n")
    log("")
    log(table)
    log(f"\nwrote {out_dir}/lr-grid.json, lr-grid.md  (total {results['wall_seconds']:.0f}s)")
    return results
