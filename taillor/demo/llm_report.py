"""Metrics, tables and figure of the causal-LM demo (the frozen base model is the reference).

For one run, ``ppl[i][d]`` is the perplexity on domain d (``DOMAINS``) after training task i (``TASKS`` are the
first domains, in training order; English is never trained on), ``base[d]`` the base model's, and ``probe[i]``
the retention probe after task i (:mod:`taillor.demo.llm_probe`: agreement with the base model's own answers to
held-out instructions). Then, with T tasks:

* plasticity on task t      = base[t] - ppl[t][t]  (the perplexity drop on the task just learned; the frozen
  model's is 0 by definition); ``plasticity`` = the mean over tasks of the relative drop 1 - ppl[t][t] / base[t]
* task change, t < T-1       = ppl[T-1][t] / ppl[t][t] - 1  (what the later tasks did to task t; 0 = all kept);
  ``first_task_change`` is task 0's (German after the last task)
* probe                      = the agreement (and answer NLL) after the last task: the pre-trained skill kept
  (the frozen model's values are the reference)
* English change             = ppl[T-1][english] / base[english] - 1. Not a retention measure: every task
  teaches generic text statistics, so English perplexity falls for every method
* BWT, forgetting            = :func:`taillor.continual.summarize` of R[i][j] = -ln ppl[i][j] over the tasks
  (mean log-likelihood per token, nats; BWT averages over every earlier task; negative BWT = forgetting)
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

from ..continual import summarize
from .llm_methods import LABELS

__all__ = ["DOMAINS", "TASKS", "run_metrics", "aggregate", "format_table", "dominators", "format_dominance",
           "format_generations", "format_spectral_summary", "plot_results"]

TASKS = ("german", "code", "csv")
DOMAINS = TASKS + ("english",)


def run_metrics(ppl: Sequence[Sequence[float]], base: Sequence[float], probe: Optional[Sequence[dict]] = None,
                base_probe: Optional[dict] = None) -> dict:
    """The metrics of one run from its perplexity matrix (tasks x domains), the base perplexities and, if given,
    the probe after each task (``{"agreement", "nll"}`` dicts) and the base model's probe."""
    T = len(TASKS)
    if len(ppl) != T or any(len(row) != len(DOMAINS) for row in ppl) or len(base) != len(DOMAINS):
        raise ValueError(f"expected a {T}x{len(DOMAINS)} perplexity matrix and {len(DOMAINS)} base values")
    if (probe is None) != (base_probe is None) or (probe is not None and len(probe) != T):
        raise ValueError(f"the probe needs one value per task ({T}) and the base model's value")
    english = DOMAINS.index("english")
    summary = summarize([[-math.log(ppl[i][j]) for j in range(T)] for i in range(T)])
    out = {
        "plasticity_per_task": [base[t] - ppl[t][t] for t in range(T)],
        "plasticity_relative_per_task": [1 - ppl[t][t] / base[t] for t in range(T)],
        "plasticity": statistics.fmean(1 - ppl[t][t] / base[t] for t in range(T)),
        "task_change": [ppl[-1][t] / ppl[t][t] - 1 for t in range(T - 1)],
        "english_change": ppl[-1][english] / base[english] - 1,
        "first_task_change": ppl[-1][0] / ppl[0][0] - 1,
        "bwt_nats": summary["bwt"],
        "forgetting_nats": summary["forgetting"],
        "final_mean_nll": -summary["acc"],
    }
    if probe is not None:
        out.update(probe_agreement=probe[-1]["agreement"], probe_agreement_per_task=[p["agreement"] for p in probe],
                   probe_nll_change=probe[-1]["nll"] - base_probe["nll"])
    return out


def _mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict], methods: Sequence[str]) -> dict:
    """Per method: mean and std over seeds of the perplexity matrix and of every metric."""
    out = {}
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        T, D = len(rs[0]["ppl"]), len(DOMAINS)
        entry = {"seeds": [r["seed"] for r in rs],
                 "ppl": [[_mean_std([r["ppl"][i][d] for r in rs]) for d in range(D)] for i in range(T)],
                 "trainable_params": rs[0]["trainable_params"]}
        for key in rs[0]["metrics"]:
            if isinstance(rs[0]["metrics"][key], list):
                entry[key] = [_mean_std([r["metrics"][key][t] for r in rs]) for t in range(len(rs[0]["metrics"][key]))]
            else:
                entry[key] = _mean_std([r["metrics"][key] for r in rs])
        speeds = [r["tokens_per_second"] for r in rs if r.get("tokens_per_second")]
        entry["tokens_per_second"] = _mean_std(speeds) if speeds else None
        entry["wall_seconds"] = _mean_std([r["wall_seconds"] for r in rs])
        out[name] = entry
    return out


def _fmt(pair, spec: str) -> str:
    mean, std = pair
    return f"{mean:{spec}}" if std == 0 else f"{mean:{spec}}±{std:{spec.lstrip('+')}}"


def format_table(agg: dict, base: Sequence[float], base_probe: Optional[dict] = None) -> str:
    """Plain-text tables: the perplexity matrix per method; plasticity, the retention probe and forgetting; each
    earlier task's perplexity change from after it was learned to after the last task."""
    stages = "after " + " → after ".join(TASKS)
    lines = [f"Perplexity (base → {stages}); lower is better", ""]
    width = 6 * (len(TASKS) + 1) + 2
    head = f"{'method':<22}" + "".join(f" {d:>{width}}" for d in DOMAINS)
    lines += [head, "-" * len(head)]
    for name, e in agg.items():
        cells = []
        for d in range(len(DOMAINS)):
            cells.append("→".join([f"{base[d]:.1f}"] + [f"{e['ppl'][i][d][0]:.1f}" for i in range(len(TASKS))]))
        lines.append(f"{LABELS.get(name, name):<22}" + "".join(f" {c:>{width}}" for c in cells))
    probe_note = ""
    if base_probe is not None:
        probe_note = (f"; probe = agreement with the base model's greedy answers to held-out instructions after the "
                      f"last task (base {base_probe['agreement']:.3f}), ΔNLL = change of their NLL (nats/token, "
                      f"0 = kept)")
    lines += ["", f"plasticity = relative ppl drop on the task just learned (frozen: 0){probe_note}; "
                  f"{TASKS[0]} Δ = its ppl change from after it was learned to after {TASKS[-1]}; BWT in "
                  f"nats/token over every earlier task (negative = forgetting); English Δ = ppl change on "
                  f"never-trained English (it falls for every method: not a retention measure)", ""]
    plast = "".join(f" {'plast. ' + t:>13}" for t in TASKS)
    head = (f"{'method':<22}{plast} {'plast. rel':>11} {'probe':>12} {'probe ΔNLL':>12} "
            f"{TASKS[0] + ' Δ':>13} {'BWT nats':>13} {'English Δ':>12} {'trainable':>11} {'tok/s':>7} {'time s':>7}")
    lines += [head, "-" * len(head)]
    for name, e in agg.items():
        tps = "-" if e["tokens_per_second"] is None else f"{e['tokens_per_second'][0]:.0f}"
        cells = "".join(f" {_fmt(p, '+.2f'):>13}" for p in e["plasticity_per_task"])
        probe = _fmt(e["probe_agreement"], ".3f") if "probe_agreement" in e else "-"
        dnll = _fmt(e["probe_nll_change"], "+.3f") if "probe_nll_change" in e else "-"
        lines.append(
            f"{LABELS.get(name, name):<22}{cells} {_fmt(e['plasticity'], '+.1%'):>11} {probe:>12} {dnll:>12} "
            f"{_fmt(e['first_task_change'], '+.1%'):>13} {_fmt(e['bwt_nats'], '+.3f'):>13} "
            f"{_fmt(e['english_change'], '+.1%'):>12} {e['trainable_params']:>11,} {tps:>7} "
            f"{e['wall_seconds'][0]:>7.0f}")
    earlier = TASKS[:-1]
    lines += ["", f"Each earlier task after {TASKS[-1]}: ppl change since it was learned (0 = all kept)", ""]
    head = f"{'method':<22}" + "".join(f" {t + ' Δ':>13}" for t in earlier)
    lines += [head, "-" * len(head)]
    for name, e in agg.items():
        lines.append(f"{LABELS.get(name, name):<22}" + "".join(f" {_fmt(c, '+.1%'):>13}" for c in e["task_change"]))
    if "taillor-head" in agg and "probe_agreement" in agg["taillor-head"]:
        lines += ["", format_dominance(agg)]
    return "\n".join(lines)


# The three measures of the dominance verdict, each oriented so that larger is better.
DOMINANCE_AXES = (("plasticity", "plasticity"), ("bwt_nats", "BWT (earlier tasks kept)"),
                  ("probe_agreement", "probe agreement"))


def dominators(agg: dict, reference: str = "taillor-head") -> list[str]:
    """The methods whose means are at least ``reference``'s on every axis of ``DOMINANCE_AXES`` and above it on
    one (frozen is left out: it learns nothing)."""
    ref = [agg[reference][key][0] for key, _ in DOMINANCE_AXES]
    out = []
    for name, e in agg.items():
        if name in (reference, "frozen") or any(key not in e for key, _ in DOMINANCE_AXES):
            continue
        values = [e[key][0] for key, _ in DOMINANCE_AXES]
        if all(v >= r for v, r in zip(values, ref)) and any(v > r for v, r in zip(values, ref)):
            out.append(name)
    return out


def format_dominance(agg: dict, reference: str = "taillor-head") -> str:
    """The verdict: which methods dominate ``reference`` (TailLoR at the library defaults) on plasticity, BWT
    and the probe, and by how much (differences of the means, with the seed standard deviations)."""
    names = dominators(agg, reference)
    label = LABELS.get(reference, reference)
    if not names:
        return f"Dominance: no method is at least as good as {label} on plasticity, BWT and probe agreement at once."
    lines = [f"Dominance: {len(names)} method(s) at least as good as {label} on plasticity, BWT and probe at once:"]
    for name in names:
        deltas = ", ".join(f"{text} {agg[name][key][0] - agg[reference][key][0]:+.3f} "
                           f"(±{agg[name][key][1]:.3f} vs ±{agg[reference][key][1]:.3f})"
                           for key, text in DOMINANCE_AXES)
        lines.append(f"  {LABELS.get(name, name)}: {deltas}")
    return "\n".join(lines)


def format_generations(runs: list[dict], methods: Sequence[str]) -> str:
    """The greedy continuations after each task of each method's first run."""
    lines = []
    for name in methods:
        run = next((r for r in runs if r["method"] == name), None)
        if run is None:
            continue
        lines.append(f"{LABELS.get(name, name)} (seed {run['seed']}) greedy continuations after each task:")
        for task, generations in zip(TASKS, run["generations"]):
            lines += [f"  after {task:<6} {k:<7} {text!r}" for k, text in generations.items()]
    return "\n".join(lines)


def format_spectral_summary(spectral: dict) -> str:
    """Per method, the mean over its reported layers of the head shares and |ΔW|/|W|; then TailLoR's per-layer
    table."""
    from ..report import format_spectral_report

    lines = ["Spectral report, mean over the reported layers (share of ||ΔW||² in the top-h singular directions):"]
    for name, rows in spectral.items():
        n = len(rows)
        lines.append(f"  {LABELS.get(name, name):<22} head share L "
                     f"{100 * sum(r.head_share_left for r in rows) / n:5.2f}%  R "
                     f"{100 * sum(r.head_share_right for r in rows) / n:5.2f}%  (uniform "
                     f"{100 * rows[0].uniform_share:.2f}%)  |ΔW|/|W| {sum(r.relative_delta for r in rows) / n:.4f}")
    if "taillor-full" in spectral:
        lines += ["", "TailLoR (full frame) per layer:", format_spectral_report(spectral["taillor-full"])]
    return "\n".join(lines)


def plot_results(agg: dict, base: Sequence[float], base_probe: Optional[dict], path: str, title: str) -> str:
    """PNG: perplexity per domain across the stages, one line per method, and the probe vs plasticity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["base"] + [f"after {t}" for t in TASKS]
    fig, axes = plt.subplots(1, len(DOMAINS) + 1, figsize=(4.2 * (len(DOMAINS) + 1), 4.2))
    for d, domain in enumerate(DOMAINS):
        ax = axes[d]
        for name, e in agg.items():
            mean = [base[d]] + [e["ppl"][i][d][0] for i in range(len(TASKS))]
            std = [0.0] + [e["ppl"][i][d][1] for i in range(len(TASKS))]
            ax.errorbar(range(len(stages)), mean, yerr=std, marker="o", ms=3, capsize=2,
                        label=LABELS.get(name, name), ls="--" if name == "frozen" else "-")
        ax.set_xticks(range(len(stages)), stages, fontsize=7)
        ax.set_title(f"{domain} perplexity" + (" (never trained on)" if domain not in TASKS else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for name, e in agg.items():
        if "probe_agreement" not in e:
            continue
        ax.errorbar(100 * e["plasticity"][0], 100 * e["probe_agreement"][0], xerr=100 * e["plasticity"][1],
                    yerr=100 * e["probe_agreement"][1], marker="o", capsize=2, label=LABELS.get(name, name))
    if base_probe is not None:
        ax.axhline(100 * base_probe["agreement"], color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("plasticity: mean ppl drop on the task just learned (%)", fontsize=8)
    ax.set_ylabel("agreement with the base model's answers (%)", fontsize=8)
    ax.set_title("retention (probe) vs plasticity (right and high is better)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
