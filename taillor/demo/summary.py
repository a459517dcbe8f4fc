"""Summaries of demo runs: per-run plasticity and retention against the frozen reference, means over seeds,
and the printed table.

A run's **plasticity** is its ACC minus the ACC of the frozen reference with the same seed (same heads, steps,
batches and test sets, so the difference is paired). **Retention** is reported three ways: retrieval R@1 kept
(final / base), the final cosine similarity of embeddings to the base model's, and the spectral report's share
of ‖ΔW‖² in the pre-trained head (uniform ≈ h/m; lower = the update stayed out of the head).
"""

from __future__ import annotations

import math
import statistics

from ..continual import plasticity
from .settings import LABELS

__all__ = ["mean_std", "with_plasticity", "point_metrics", "aggregate", "format_table"]


def mean_std(values) -> tuple[float, float]:
    """(mean, sample std) of the finite values; std 0 for one value, NaNs for none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, digits=3, signed=False) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{m:{spec}}" if len(values) < 2 else f"{m:{spec}}±{s:.{digits}f}"


def with_plasticity(runs: list[dict]) -> list[dict]:
    """Set ``run["plasticity"]`` on every run: ACC − the ACC of the frozen run with the same seed and steps per
    task (None without one). The frozen reference does not depend on the encoder's learning rate or alpha."""
    frozen = {(r["seed"], r.get("steps")): r for r in runs if r["method"] == "frozen"}
    for r in runs:
        ref = frozen.get((r["seed"], r.get("steps")))
        r["plasticity"] = plasticity(r["R"], ref["R"]) if ref is not None else None
    return runs


def point_metrics(rs: list[dict]) -> dict:
    """Mean and std over seeds of the frontier coordinates of a list of runs of one setting."""
    return {
        "acc": mean_std([r["metrics"]["acc"] for r in rs]),
        "plasticity": mean_std([r.get("plasticity") for r in rs]),
        "bwt": mean_std([r["metrics"]["bwt"] for r in rs]),
        "forgetting": mean_std([r["metrics"]["forgetting"] for r in rs]),
        "r1_retention": mean_std([r["probes"]["retrieval_r1"][-1] / r["probes"]["retrieval_r1"][0] for r in rs]),
        "cosine": mean_std([r["probes"]["cosine_to_base"][-1] for r in rs]),
        "head_share": mean_std([r.get("head_share") for r in rs]),
        "wall_seconds": mean_std([r["wall_seconds"] for r in rs]),
    }


def aggregate(runs: list[dict], methods) -> dict:
    """Per method: mean and std over seeds of every metric, the mean accuracy matrix and probe curves."""
    agg = {}
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        T = len(rs[0]["R"])
        R_mean = [[mean_std([r["R"][i][j] for r in rs])[0] if j <= i else None for j in range(T)] for i in range(T)]
        entry = {"seeds": [r["seed"] for r in rs], "R_mean": R_mean, "trainable_params": rs[0]["trainable_params"]}
        entry.update(point_metrics(rs))
        entry["acc_per_step"] = [mean_std([r["metrics"]["acc_per_step"][t] for r in rs]) for t in range(T)]
        for probe in ("retrieval_r1", "cosine_to_base"):
            entry[probe] = [mean_std([r["probes"][probe][t] for r in rs]) for t in range(T + 1)]
        agg[name] = entry
    return agg


def format_table(runs: list[dict], methods) -> str:
    """The demo's table: one row per method (mean ± std over seeds), the frozen reference first."""
    head = (f"{'method':<21} {'ACC':>11} {'plasticity':>12} {'BWT':>12} {'forgetting':>11} {'R@1 kept':>9} "
            f"{'cos to base':>12} {'head share':>10} {'trainable':>10} {'s/run':>6}")
    lines = [head, "-" * len(head)]
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        kept = [r["probes"]["retrieval_r1"][-1] / r["probes"]["retrieval_r1"][0] for r in rs]
        share = "—" if name == "frozen" else f"{100 * mean_std([r.get('head_share') for r in rs])[0]:.2f}%"
        lines.append(
            f"{LABELS.get(name, name):<21} {_fmt([r['metrics']['acc'] for r in rs]):>11} "
            f"{_fmt([r.get('plasticity') for r in rs], signed=True):>12} "
            f"{_fmt([r['metrics']['bwt'] for r in rs], signed=True):>12} "
            f"{_fmt([r['metrics']['forgetting'] for r in rs]):>11} {100 * mean_std(kept)[0]:>8.1f}% "
            f"{_fmt([r['probes']['cosine_to_base'][-1] for r in rs]):>12} {share:>10} "
            f"{rs[0]['trainable_params']:>10,} {mean_std([r['wall_seconds'] for r in rs])[0]:>6.0f}")
    return "\n".join(lines)
