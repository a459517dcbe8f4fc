"""The training flow that the distributed tests run in one process and in several (spawned workers, and the script
that `accelerate launch` runs): two tasks with a consolidation between them, the penalty in the loss, then the
factors and outputs that are compared. Not a test module; imported by tests/test_distributed.py and
tests/distributed_accelerate_script.py."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import taillor

STEPS, BATCH, TASKS = 3, 8, 2
FRAMES = ("full", "head")


def config(frame: str) -> taillor.TailLoRConfig:
    """Rank 2 on both layers; the head frame adapts λ to a head-share target, so λ's dual step runs too."""
    extra = {"head_share_target": 0.05} if frame == "head" else {}
    return taillor.TailLoRConfig(rank=2, head=3, penalty=1e-2, frame=frame, target_modules=["0", "2"], **extra)


def make_model(frame: str) -> nn.Module:
    """The same model on every rank (seeded); 7 outputs, so that FSDP2 shards the second layer unevenly (4 + 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 7))
    return taillor.apply_taillor(model, config(frame), progress=False)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, targets): x (BATCH, 12) and one target (BATCH, 7) per task."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, generator=g), torch.randn(TASKS, BATCH, 7, generator=g)


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (a DTensor is gathered: a collective), by its name in the plain model."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("module.", "")] = whole.detach().clone()
    return out


def train_tasks(model: nn.Module, forward: nn.Module, rows: slice,
                backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> dict[str, torch.Tensor]:
    """Train ``TASKS`` tasks of ``STEPS`` SGD steps on x[rows] (the loss's mean over these rows; data-parallel
    ranks average their gradients, so the global batch is the whole batch), consolidating between tasks.

    ``model`` is the TailLoR model, ``forward`` what runs it (the model itself, or its DDP wrapper). The penalty is
    summed once per rank: gradient averaging then counts it once, as in one process. Plain SGD keeps no state, so
    one optimizer serves both tasks. Returns the outputs on the whole batch after each task (evaluated without
    gradients) and the final factors.
    """
    x, targets = data()
    optimizer = torch.optim.SGD([p for p in forward.parameters() if p.requires_grad], lr=0.1)
    results = {}
    for task in range(TASKS):
        for _ in range(STEPS):
            loss = (forward(x[rows]) - targets[task][rows]).pow(2).mean() + taillor.spectral_penalty(model)
            optimizer.zero_grad()
            backward(loss)
            optimizer.step()
        with torch.no_grad():
            results[f"output.task{task}"] = forward(x).detach().clone()
        if task < TASKS - 1:
            taillor.consolidate(model)
    results.update({f"factor.{name}": t for name, t in factors(model).items()})
    return results
