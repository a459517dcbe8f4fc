"""What defines a demo run: the methods compared and :class:`DemoSettings` (recorded in results.json)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from ..config import TailLoRConfig
from .tasks import DEFAULT_TASKS

__all__ = ["DemoSettings", "QUICK", "DEFAULT", "METHODS", "DEFAULT_METHODS", "ENCODER_PEERS", "LABELS",
           "ADAPTER_METHODS", "LR_FIELDS", "COST_ORDER"]

DEFAULT_METHODS = ("frozen", "taillor-full", "taillor-head", "lora-continued", "lora-merged", "full-ft")
# The peers of :mod:`taillor.demo.peers` that apply to an encoder with task heads (``--methods all``, frontier).
ENCODER_PEERS = ("osf", "pissa-merged", "o-lora")
METHODS = DEFAULT_METHODS + ENCODER_PEERS
ADAPTER_METHODS = ("taillor-full", "taillor-head", "lora-continued", "lora-merged", "pissa-merged", "o-lora")
LABELS = {
    "frozen": "frozen (heads only)",
    "taillor-full": "TailLoR (full frame)",
    "taillor-head": "TailLoR (head frame)",
    "lora-continued": "LoRA (continued)",
    "lora-merged": "LoRA (merge+restart)",
    "full-ft": "full fine-tuning",
    "osf": "OSF (PEFT)",
    "pissa-merged": "PiSSA (merge+restart)",
    "o-lora": "O-LoRA",
}

# The order in which the worker processes get the runs: longest first (measured). The frozen reference (the
# cheapest) is run by the main process meanwhile.
COST_ORDER = ("full-ft", "osf", "taillor-full", "taillor-head", "lora-continued", "lora-merged", "pissa-merged",
              "o-lora", "frozen")

# The DemoSettings field that holds each trained method's encoder learning rate.
LR_FIELDS = {"taillor-full": "lr_taillor_full", "taillor-head": "lr_taillor_head", "lora-continued": "lr_lora",
             "lora-merged": "lr_lora", "full-ft": "lr_full", "osf": "lr_osf", "pissa-merged": "lr_pissa",
             "o-lora": "lr_olora"}

_LIBRARY = {f.name: f.default for f in fields(TailLoRConfig)}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run. TailLoR runs with the library's defaults (head, penalty,
    head_share_target, init) unless they are overridden here; ``penalty=0`` turns the penalty off."""

    tasks: tuple = DEFAULT_TASKS  # the task sequence, by name (taillor.demo.tasks.TASKS)
    n_train: int = 160          # training examples per class (capped by the smallest class)
    n_test: int = 40            # test examples per class
    retrieval_pairs: int = 200  # docstring/code pairs for the retention probe
    steps: int = 100            # optimizer steps per task
    batch_size: int = 16
    max_length: int = 64        # tokens (task texts and retrieval texts)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("query", "value")
    # Each method at its own tuned learning rate (the frontier, README). The full frame's is lower: Adam scales
    # every coordinate's step to about lr, and in the full frame the coordinates are singular directions, so the
    # many weak tail directions (small gradients) move as fast as strong ones and the same lr moves the model more.
    lr_taillor_full: float = 3e-4   # TailLoR, full frame
    lr_taillor_head: float = 1e-3   # TailLoR, head frame (A, B in the layer's coordinates, as LoRA's)
    lr_lora: float = 1e-3       # PEFT LoRA, both variants (the best of its sweep on the frontier, see README)
    lr_full: float = 3e-5       # full fine-tuning
    # The peers: the rate of each one's three-rate grid (frontier.PEER_LRS) with the highest ACC on the quick
    # frontier of the demo's tasks (1 seed, docs/results.md); OSF's and PiSSA's are the top of their grids (OSF's
    # 3e-4 from a separate run after the frontier's grid, 1e-5 to 1e-4, topped out)
    lr_osf: float = 3e-4        # PEFT OSF (PEFT advises 1e-5 to 1e-4; 3e-4 learned far more here)
    lr_pissa: float = 1e-3      # PiSSA-initialized LoRA, merge+restart
    lr_olora: float = 1e-3      # O-LoRA
    lr_head: float = 5e-2       # the task heads, for every method and the frozen reference
    head: float = _LIBRARY["head"]  # TailLoR head (fraction of min(d_out, d_in))
    report_head: float = 0.25   # the head in which the spectral report measures every method's update
    penalty: float = _LIBRARY["penalty"]
    head_share_target: Optional[float] = _LIBRARY["head_share_target"]
    init: str = _LIBRARY["init"]
    protect_tasks: bool = _LIBRARY["protect_tasks"]
    protect_tasks_weight: float = _LIBRARY["protect_tasks_weight"]
    seeds: int = 3
    methods: tuple = DEFAULT_METHODS
    workers: int = 2            # processes that run methods side by side, one torch thread each

    def lr_of(self, method: str) -> float:
        """The encoder learning rate of ``method`` (None for the frozen reference)."""
        return getattr(self, LR_FIELDS[method]) if method in LR_FIELDS else None

    def taillor_config(self, frame: str, seed: int) -> TailLoRConfig:
        """The TailLoRConfig of the TailLoR methods under these settings."""
        return TailLoRConfig(rank=self.rank, alpha=self.alpha, target_modules=list(self.targets), frame=frame,
                             head=self.head, penalty=self.penalty, init=self.init, seed=seed,
                             head_share_target=self.head_share_target, protect_tasks=self.protect_tasks,
                             protect_tasks_weight=self.protect_tasks_weight)


# --quick: <= 5 min on 2 CPU cores (two workers with one torch thread each; measured, see README). Full fine-tuning,
# the costliest run (it steps all 22.7 M weights), is left out of the quick default and added with --methods.
QUICK = DemoSettings(n_train=80, n_test=24, retrieval_pairs=100, steps=30, max_length=40, seeds=1,
                     methods=tuple(m for m in DEFAULT_METHODS if m != "full-ft"))
DEFAULT = DemoSettings()
