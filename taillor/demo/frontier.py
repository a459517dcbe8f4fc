"""``taillor demo --frontier``: the stability–plasticity frontier of every method on the demo.

One run is one point (plasticity, retention): plasticity = ACC − ACC(frozen, same seed), retention = retrieval
R@1 kept and the final cosine similarity to the base model's embeddings. Each method sweeps its own strength:

* TailLoR, both frames: no penalty (λ = 0), head-share targets ρ (:mod:`taillor.strength`) and the default with
  ``protect_tasks`` switched (off, as the library default has it on); the full grid adds the defaults of earlier releases (fixed λ = 10, Kaiming init) and, at the
  default strength, a smaller head and the learning rate ×0.3 and ×3;
* PEFT LoRA, merge+restart and continued, over its learning rate (the baseline is tuned, not handicapped);
* full fine-tuning over its learning rate (full grid only: its runs are the longest);
* the peers (:mod:`taillor.demo.peers`: PEFT OSF, PiSSA merge+restart, O-LoRA), each over its own three-rate
  learning-rate grid (``PEER_LRS``, in the quick grid too: as many rates as LoRA's);
* the frozen reference (the origin of the plasticity axis).

The quick grid (``--frontier --quick``) has 26 points (15 before the peers and ``protect_tasks``: 12 minutes on
two cores); the full grid has 36.

A point is *dominated* when another point has at least its plasticity and at least its retention, one of them
strictly; the non-dominated points form the frontier. Writes ``frontier.json``, ``frontier.png`` and
``frontier.md`` (the table) to the output folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

from .settings import COST_ORDER, ENCODER_PEERS, LABELS, LR_FIELDS, DemoSettings

__all__ = ["FrontierPoint", "frontier_points", "robustness_points", "run_frontier", "run_robustness", "run_points",
           "dominated", "format_frontier", "format_robustness"]

# TailLoR: a strength sweep at the library's head and learning rate, the default strength with a smaller head and
# with the learning rate ×0.3 and ×3 (TailLoR is tuned like the baselines), and the defaults of earlier releases.
TAILLOR_STRENGTHS = (("λ=0", {"penalty": 0.0}),
                     ("default", {}),
                     ("ρ=0.01", {"head_share_target": 0.01}),
                     ("ρ=0.002", {"head_share_target": 0.002}),
                     ("protect_tasks toggled", {}))  # the library's protect_tasks switched (see frontier_points)
TAILLOR_VARIANTS = (("λ=10 fixed, kaiming (previous default)",
                     {"penalty": 10.0, "head_share_target": None, "init": "kaiming"}),
                    ("default, head 0.1", {"head": 0.1}),
                    ("default, lr ×0.3", {"lr": "×0.3"}),
                    ("default, lr ×3", {"lr": "×3"}))
LORA_LRS = (3e-4, 1e-3, 3e-3)
FULL_FT_LRS = (1e-5, 3e-5)
# Each peer's learning-rate grid: three rates a factor ~3 apart, as LoRA's (OSF: PEFT advises 1e-5 to 1e-4).
PEER_LRS = {"osf": (3e-5, 1e-4, 3e-4), "pissa-merged": (1e-4, 3e-4, 1e-3), "o-lora": (3e-4, 1e-3, 3e-3)}
RETENTION_AXES = (("r1_retention", "retrieval R@1 kept (final / base)"),
                  ("cosine", "cosine to base embeddings (final)"))


@dataclass(frozen=True)
class FrontierPoint:
    """One setting of one method: ``overrides`` are DemoSettings fields."""

    method: str
    label: str
    overrides: tuple = ()

    def settings(self, base: DemoSettings) -> DemoSettings:
        return replace(base, **dict(self.overrides))


def frontier_points(settings: DemoSettings, quick: bool = False) -> list[FrontierPoint]:
    """The grid: every method's sweep, TailLoR around ``settings`` (its head, strength and learning rate);
    ``quick``: without full fine-tuning and TailLoR's variants (its strength sweep, LoRA's and the peers' rates stay)."""
    points = [FrontierPoint("frozen", "frozen")]
    for method in ("taillor-full", "taillor-head"):
        default = (f"default (ρ={settings.head_share_target:g}, head {settings.head:g}, "
                   f"lr {settings.lr_of(method):g})")
        for name, overrides in TAILLOR_STRENGTHS:
            if name == "protect_tasks toggled":
                name, overrides = f"protect_tasks={not settings.protect_tasks}", {
                    "protect_tasks": not settings.protect_tasks}
            points.append(FrontierPoint(method, default if name == "default" else name,
                                        tuple(sorted(overrides.items()))))
        for name, overrides in () if quick else TAILLOR_VARIANTS:
            if "lr" in overrides:
                factor = float(overrides["lr"].lstrip("×"))
                overrides = {LR_FIELDS[method]: settings.lr_of(method) * factor}
            points.append(FrontierPoint(method, name, tuple(sorted(overrides.items()))))
    for method in ("lora-merged", "lora-continued"):
        points += [FrontierPoint(method, f"lr {lr:g}", (("lr_lora", lr),)) for lr in LORA_LRS]
    if not quick:
        points += [FrontierPoint("full-ft", f"lr {lr:g}", (("lr_full", lr),)) for lr in FULL_FT_LRS]
    for method in ENCODER_PEERS:
        field = LR_FIELDS[method]
        points += [FrontierPoint(method, f"lr {lr:g}", ((field, lr),)) for lr in PEER_LRS[method]]
    return points


def robustness_points(settings: DemoSettings) -> list[FrontierPoint]:
    """TailLoR at the library default next to λ = 0, for each frame in ``settings.methods`` (both by default),
    with the adapter learning rate and the steps per task halved and doubled and alpha doubled; the frozen
    reference at each step count."""
    def variants(method):
        field, lr = LR_FIELDS[method], settings.lr_of(method)
        return [("as set", ()), ("lr ×0.5", ((field, lr / 2),)), ("lr ×2", ((field, lr * 2),)),
                ("steps ×0.5", (("steps", max(1, settings.steps // 2)),)),
                ("steps ×2", (("steps", settings.steps * 2),)), ("alpha ×2", (("alpha", settings.alpha * 2),))]

    points = [FrontierPoint("frozen", name, overrides) for name, overrides in variants("taillor-head")
              if name in ("as set", "steps ×0.5", "steps ×2")]
    for method in (m for m in ("taillor-full", "taillor-head") if m in settings.methods):
        for name, overrides in variants(method):
            points.append(FrontierPoint(method, f"default, {name}", overrides))
            points.append(FrontierPoint(method, f"λ=0, {name}", tuple(sorted(overrides + (("penalty", 0.0),)))))
    return points


def format_robustness(rows: list[dict]) -> str:
    """Per frame and variant: the default's plasticity and retention next to λ = 0's and frozen's, and whether
    the default lies strictly between them (it learns more than frozen and keeps more than λ = 0)."""
    def find(method, label):
        return next(r for r in rows if r["method"] == method and r["label"] == label)

    lines = ["| frame | variant | plasticity: default (λ=0) | R@1 kept: default (λ=0, frozen) | "
             "cos to base: default (λ=0) | head share: default (λ=0) | between frozen and λ=0 |",
             "|---|---|---|---|---|---|---|"]
    for method in ("taillor-full", "taillor-head"):  # the frames that ran
        for row in (r for r in rows if r["method"] == method and r["label"].startswith("default, ")):
            variant = row["label"].removeprefix("default, ")
            free = find(method, f"λ=0, {variant}")
            steps_variant = variant if variant.startswith("steps") else "as set"
            frozen = find("frozen", steps_variant)
            learns = row["plasticity"][0] > 0
            keeps = row["r1_retention"][0] >= free["r1_retention"][0] and row["cosine"][0] > free["cosine"][0]
            lines.append(
                f"| {method.removeprefix('taillor-')} | {variant} | {row['plasticity'][0]:+.3f} "
                f"({free['plasticity'][0]:+.3f}) | {100 * row['r1_retention'][0]:.1f}% "
                f"({100 * free['r1_retention'][0]:.1f}%, {100 * frozen['r1_retention'][0]:.1f}%) | "
                f"{row['cosine'][0]:.3f} ({free['cosine'][0]:.3f}) | {100 * row['head_share'][0]:.2f}% "
                f"({100 * free['head_share'][0]:.2f}%) | {'yes' if learns and keeps else 'no'}"
                f"{'' if learns else ': does not learn'}{'' if keeps else ': does not keep more'} |")
    return "\n".join(lines)


def dominated(rows: list[dict], axis: str) -> list[bool]:
    """For each row, whether another row has plasticity and ``axis`` (a retention) both >=, one of them >."""
    coords = [(r["plasticity"][0], r[axis][0]) for r in rows]
    return [any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in coords) for p in coords]


def _point_rows(points: list[FrontierPoint], runs: list[dict]) -> list[dict]:
    from .summary import point_metrics

    rows = []
    for i, point in enumerate(points):
        rs = [r for r in runs if r["point"] == i]
        rows.append({"method": point.method, "label": point.label, "overrides": dict(point.overrides),
                     "seeds": len(rs), **point_metrics(rs)})
    for axis, _ in RETENTION_AXES:
        for row, is_dominated in zip(rows, dominated(rows, axis)):
            row[f"on_frontier_{axis}"] = not is_dominated
    return rows


def format_frontier(rows: list[dict]) -> str:
    """A markdown table of the points (mean ± std over seeds) and, per retention measure, the frontier."""
    def cell(pair, pct=False, signed=False):
        m, s = pair
        scale = 100 if pct else 1
        spec = "+.3f" if signed else (".1f" if pct else ".3f")
        text = f"{scale * m:{spec}}" + ("%" if pct else "")
        return text if not s else f"{text} ± {scale * s:.{1 if pct else 3}f}"

    lines = ["| method | setting | plasticity | ACC | R@1 kept | cos to base | head share | BWT | on frontier |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        marks = [name for name, key in (("R@1", "r1_retention"), ("cos", "cosine")) if r[f"on_frontier_{key}"]]
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['label']} | {cell(r['plasticity'], signed=True)} "
                     f"| {cell(r['acc'])} | {cell(r['r1_retention'], pct=True)} | {cell(r['cosine'])} | "
                     f"{cell(r['head_share'], pct=True)} | {cell(r['bwt'], signed=True)} | {', '.join(marks)} |")
    lines.append("")
    for axis, text in RETENTION_AXES:
        best = [r for r in rows if r[f"on_frontier_{axis}"]]
        best.sort(key=lambda r: r["plasticity"][0])
        lines.append(f"Frontier on {text}, by increasing plasticity: " + "; ".join(
            f"{LABELS.get(r['method'], r['method'])} ({r['label']})" for r in best) + ".")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: str, title: str) -> str:
    """Write ``path``: retention against plasticity, one marker per point, one colour per method, error bars
    over seeds, the frontier drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"frozen": "s", "taillor-full": "o", "taillor-head": "D", "lora-merged": "^",
               "lora-continued": "v", "full-ft": "P", "osf": "X", "pissa-merged": "<", "o-lora": ">"}
    fig, axes = plt.subplots(1, len(RETENTION_AXES), figsize=(13, 5.4))
    for ax, (axis, text) in zip(axes, RETENTION_AXES):
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == method]
            ax.errorbar([r["plasticity"][0] for r in rs], [r[axis][0] for r in rs],
                        xerr=[r["plasticity"][1] for r in rs], yerr=[r[axis][1] for r in rs],
                        fmt=markers.get(method, "o"), ms=6, capsize=2, label=LABELS.get(method, method), alpha=0.85)
            for r in rs:
                ax.annotate(r["label"].replace("head ", "h"), (r["plasticity"][0], r[axis][0]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in rows if r[f"on_frontier_{axis}"]), key=lambda r: r["plasticity"][0])
        ax.step([r["plasticity"][0] for r in front], [r[axis][0] for r in front], "k:", where="post", lw=1,
                label="frontier")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_xlabel("plasticity: ACC − ACC(frozen)")
        ax.set_ylabel(text)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_frontier(settings: DemoSettings, out_dir: str, quick: bool = False, log=print) -> dict:
    """Run every point of :func:`frontier_points` (the quick grid with ``quick``) for ``settings.seeds`` seeds;
    write frontier.json, .png, .md."""
    return run_points(frontier_points(settings, quick), settings, out_dir, "frontier", log)


def run_robustness(settings: DemoSettings, out_dir: str, log=print) -> dict:
    """Run :func:`robustness_points`; write robustness.json, .png and .md (the table of
    :func:`format_robustness`)."""
    return run_points(robustness_points(settings), settings, out_dir, "robustness", log)


def run_points(points: list[FrontierPoint], settings: DemoSettings, out_dir: str, kind: str, log=print) -> dict:
    """Run each point for ``settings.seeds`` seeds in ``settings.workers`` processes; write ``<kind>.json``,
    ``<kind>.png`` and ``<kind>.md`` to ``out_dir`` and return the JSON document."""
    from .methods import describe, run_job
    from .pool import run_jobs, worker_pool
    from .run import environment, load_base, prepare
    from .summary import with_plasticity

    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(p.method, p.settings(settings), seed) for seed in range(settings.seeds) for p in points]
    with worker_pool(settings.workers, len(jobs), load_base, settings) as pool:
        ctx = prepare(settings, log)
        log(f"{kind}: {len(points)} points x {settings.seeds} seed(s) = {len(jobs)} runs on {settings.workers} "
            f"worker(s), {settings.steps} steps/task")
        runs = run_jobs(jobs, ctx, run_job, describe, log, pool, COST_ORDER, here=("frozen",))
    for index, run in enumerate(runs):
        run["point"] = index % len(points)  # jobs are seed-major
    runs = with_plasticity(runs)
    rows = _point_rows(points, runs)
    table = format_frontier(rows) if kind == "frontier" else format_robustness(rows)
    title = (f"{kind}: all-MiniLM-L6-v2, {settings.steps} steps/task, rank {settings.rank}, "
             f"{settings.seeds} seed(s) per point")
    figure = plot_frontier(rows, os.path.join(out_dir, f"{kind}.png"), title)
    with open(os.path.join(out_dir, f"{kind}.md"), "w") as f:
        f.write(table + "\n")
    results = {"settings": asdict(settings), "points": [asdict(p) for p in points], "rows": rows, "runs": runs,
               "environment": environment(), "wall_seconds": time.perf_counter() - t0, "figure": figure}
    with open(os.path.join(out_dir, f"{kind}.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("")
    log(table)
    log(f"\nwrote {out_dir}/{kind}.json, {kind}.md, {figure}  (total {results['wall_seconds']:.0f}s)")
    return results
