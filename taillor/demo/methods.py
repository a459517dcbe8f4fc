"""The demo's methods, its retention probe, and one run of a method through the task sequence."""

from __future__ import annotations

import copy
import random
import sys
import time

from ..continual import frozen_reference
from .peers import PEERS, Peer
from .settings import METHODS, DemoSettings

__all__ = ["Method", "SkillProbe", "run_method", "run_job", "describe", "train_sequence", "spectral_rows"]


class Method:
    """One fine-tuning method on its own copy of the base model (``n_tasks``: the length of the task sequence, for
    OSF's preserved-rank schedule)."""

    def __init__(self, name: str, base_model, settings: DemoSettings, seed: int, n_tasks: int = 3):
        import torch

        self.name, self.s, self.seed = name, settings, seed
        torch.manual_seed(10_000 + seed)
        self.model = frozen_reference(base_model) if name == "frozen" else copy.deepcopy(base_model)
        self.model.train()
        self.task = 0
        self.peer = None
        if name.startswith("taillor"):
            import taillor

            self.cfg = settings.taillor_config("full" if name == "taillor-full" else "head", seed)
            taillor.apply_taillor(self.model, self.cfg)
            self.net = self.model
        elif name == "frozen":
            self.net = self.model
        elif name.startswith("lora"):
            self.net = self._new_peft(self.model)
        elif name == "full-ft":
            self.model.requires_grad_(True)
            self.net = self.model
        elif name in METHODS and name in PEERS:
            self.peer = Peer(name, self.model, rank=settings.rank, alpha=settings.alpha,
                             targets=settings.targets, n_tasks=n_tasks, seed=seed)
            self.net = self.peer.net
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
        return self.s.lr_of(self.name)

    def parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def penalty(self):
        if self.name.startswith("taillor") and self.cfg.penalty > 0:
            import taillor

            return taillor.spectral_penalty(self.net)
        if self.peer is not None:  # O-LoRA's orthogonality loss (None for the other peers)
            return self.peer.regularizer()
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
        elif self.peer is not None:
            self.net = self.peer.end_task()

    def effective_weights(self, names) -> dict:
        """The current weight of each target layer (adapters merged), float32, on copies."""
        import torch

        if self.name.startswith("lora") or self.peer is not None:
            merged = copy.deepcopy(self.net)
            merged = merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else merged
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


class SkillProbe:
    """Retrieval R@1 (docstring -> code) and mean cosine similarity of embeddings to the base model's."""

    def __init__(self, encoder, tokenizer, retrieval, max_length, base_emb=None, base_values=None,
                 encoder_is_base: bool = False):
        self.encoder, self.tok, self.ret, self.L = encoder, tokenizer, retrieval, max_length
        self.base_emb = base_emb
        self.base_values = dict(base_values) if base_values else None
        # Measurements that reuse the base values: the first (the untrained model is the base model), or every one
        # for the frozen reference, whose encoder stays the base model.
        self._reuses_left = (float("inf") if encoder_is_base else 1) if self.base_values else 0
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

        if self._reuses_left:
            self._reuses_left -= 1
            self.last = dict(self.base_values)
            return self.last
        emb, q, d = self.embed()
        r1 = (q @ d.t()).argmax(1).eq(torch.arange(len(q))).float().mean().item()
        cos = mean_cosine_similarity(emb, self.base_emb) if self.base_emb is not None else 1.0
        self.last = {"retrieval_r1": r1, "cosine_to_base": cos}
        return self.last


# --------------------------------------------------------------------------------------------- one run


def run_method(name: str, ctx: dict, settings: DemoSettings, seed: int, log=print, progress: bool = True) -> dict:
    """Train method ``name`` through the task sequence of ``ctx`` (from :func:`taillor.demo.run.prepare`).

    Returns the run's record: :meth:`ContinualResult.to_dict` plus method, seed, steps, trainable_params,
    wall_seconds, cpu_seconds (of this process; torch's threads included),
    the spectral report (``spectral``: rows as dicts; empty for the frozen reference), its mean ``head_share``
    and, for TailLoR, the layers' final penalty strengths (``penalty_strength``: min, median, max).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    method = Method(name, ctx["model"], settings, seed, n_tasks=len(ctx["tasks"]))
    record = train_sequence(method, ctx, settings, seed, log, progress)
    # CPU seconds next to wall seconds: on a shared machine the wall time says more about the neighbours.
    record.update(wall_seconds=time.perf_counter() - t_start, cpu_seconds=time.process_time() - cpu_start)
    return record


def run_job(job: tuple, ctx: dict) -> dict:
    """:func:`run_method` for a ``(name, settings, seed)`` job of :func:`taillor.demo.pool.run_jobs`, quietly."""
    name, settings, seed = job
    return run_method(name, ctx, settings, seed, log=lambda *_: None, progress=settings.workers <= 1)


def describe(record: dict) -> str:
    """One line for a finished run."""
    return (f"{record['method']:<14} seed {record['seed']}: ACC {record['metrics']['acc']:.3f}  R@1 "
            f"{record['probes']['retrieval_r1'][-1]:.3f}  cos {record['probes']['cosine_to_base'][-1]:.3f}  "
            f"({record['wall_seconds']:.0f}s)")


def train_sequence(method: Method, ctx: dict, settings: DemoSettings, seed: int, log=print,
                   progress: bool = True) -> dict:
    """The continual run of an already built ``method`` (see :func:`run_method`, which times it)."""
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    from ..continual import ContinualRunner
    from .model import Encoder, encode, tokenize

    tok, tasks, retrieval = ctx["tokenizer"], ctx["tasks"], ctx["retrieval"]
    name = method.name
    encoder = Encoder(method.net)
    heads: list[nn.Linear] = []
    dim = ctx["model"].config.hidden_size
    trainable = sum(p.numel() for p in method.parameters())
    encoder_is_base = trainable == 0  # the frozen reference: its probe values and test features never change
    probe = SkillProbe(encoder, tok, retrieval, settings.max_length, ctx["base_emb"], ctx["base_values"],
                       encoder_is_base)

    def train(t, task):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        head = nn.Linear(dim, task.num_classes)
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.02, generator=gen)
            head.bias.zero_()
        heads.append(head)
        encoder.model = method.net  # lora-merged swaps its PeftModel after each task
        encoder.train()
        encoder_params = method.parameters()
        groups = [{"params": list(head.parameters()), "lr": settings.lr_head}]
        if encoder_params:
            groups.insert(0, {"params": encoder_params, "lr": method.lr})
        # Full fine-tuning steps 22.7 M parameters: the fused kernel is the same AdamW, ~6x faster than the
        # per-tensor loop on a CPU (not bit-identical to it); the adapters' few parameters keep the default.
        opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True if name == "full-ft" else None)
        rng = random.Random(7919 * seed + t)
        order: list[int] = []
        losses, pens = [], []
        bar = tqdm(range(settings.steps), desc=f"{name:<14} seed {seed} task {t + 1}/{len(tasks)} {task.name}",
                   leave=False, dynamic_ncols=True, file=sys.stderr, mininterval=0.5, disable=not progress)
        for _ in bar:
            if len(order) < settings.batch_size:
                more = list(range(len(task.train)))
                rng.shuffle(more)
                order += more
            idx, order = order[: settings.batch_size], order[settings.batch_size:]
            batch = tokenize(tok, [task.train[i][0] for i in idx], settings.max_length)
            y = torch.tensor([task.train[i][1] for i in idx])
            with torch.set_grad_enabled(bool(encoder_params)):  # the frozen reference needs no encoder backward
                features = encoder(batch["input_ids"], batch["attention_mask"])
            logits = head(features)
            loss = nn.functional.cross_entropy(logits, y)
            pen = method.penalty()
            total = loss if pen is None else loss + pen
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(encoder_params + list(head.parameters()), 1.0)
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

    test_cache, base_features = {}, {}

    def evaluate(j, task):
        if j not in test_cache:
            test_cache[j] = ([x for x, _ in task.test], torch.tensor([y for _, y in task.test]))
        texts, y = test_cache[j]
        features = base_features.get(j)
        if features is None:
            features = encode(encoder, tok, texts, settings.max_length)
            if encoder_is_base:
                base_features[j] = features
        with torch.no_grad():
            pred = heads[j](features).argmax(1)
        return pred.eq(y).float().mean().item()

    runner = ContinualRunner(
        tasks, train, evaluate, after_task=after,
        probes={"retrieval_r1": lambda: probe.measure()["retrieval_r1"],
                "cosine_to_base": lambda: probe.last["cosine_to_base"]},
        log=lambda msg: log(f"  {name:<14} seed {seed} {msg}"))
    res = runner.run()
    out = res.to_dict()
    rows = spectral_rows(method, ctx["pretrained"])
    out.update(method=name, seed=seed, steps=settings.steps, trainable_params=trainable,
               spectral=[r.to_dict() for r in rows],
               head_share=sum(0.5 * (r.head_share_left + r.head_share_right) for r in rows) / len(rows)
               if rows else 0.0)
    if name.startswith("taillor"):
        import statistics

        import taillor

        strengths = [float(layer.penalty_strength) for _, layer in taillor.iter_taillor_layers(method.net)]
        out["penalty_strength"] = [min(strengths), statistics.median(strengths), max(strengths)]
    return out


def spectral_rows(method: Method, pretrained: dict) -> list:
    """Where the method's learned update went in each target layer's pre-trained spectrum (none for frozen),
    measured for every method with the same head (``settings.report_head``), so that the shares compare."""
    from ..report import spectral_report_from_weights

    if method.name == "frozen":
        return []
    return spectral_report_from_weights(pretrained, method.effective_weights(list(pretrained)),
                                        method.s.report_head)
