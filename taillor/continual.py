"""Continual learning: a small runner for task sequences and the standard metrics.

The runner knows nothing about models or data; you give it callbacks::

    from taillor.continual import ContinualRunner

    def train(t, task):            # fit task t (your optimizer, your loss, + taillor.spectral_penalty(model))
        ...
    def after_task(t, task):       # consolidate between tasks, freeze task t's head, ...
        taillor.consolidate(model)
    def evaluate(j, task):         # accuracy (or any score) of the current model on task j's test split
        return accuracy

    result = ContinualRunner(tasks, train, evaluate, after_task=after_task,
                             probes={"retrieval_r1": lambda: r_at_1(model)}).run()
    result.R                       # accuracy matrix, R[i][j] = score on task j after training task i
    result.metrics()               # {"acc": ..., "bwt": ..., "forgetting": ..., ...}
    result.probes["retrieval_r1"]  # [before any training, after task 0, after task 1, ...]

Order of one run: every probe is measured once before any training; then for each task t:
``train_fn(t, task)``, ``after_task(t, task)``, ``eval_fn(j, tasks[j])`` for every j <= t (and for j > t with
``eval_future=True``), then every probe again.

Metrics over an accuracy matrix R (T x T, R[i][j] = accuracy on task j after training on tasks 0..i; only
entries with i >= j are used, entries above the diagonal may be NaN):

* average accuracy (Lopez-Paz & Ranzato, 2017)  ACC = 1/T · Σ_j R[T-1][j]
* backward transfer (Lopez-Paz & Ranzato, 2017) BWT = 1/(T-1) · Σ_{j<T-1} (R[T-1][j] - R[j][j])
  (negative = forgetting, positive = later tasks helped earlier ones; 0 when T = 1)
* forgetting (Chaudhry et al., 2018)             F = 1/(T-1) · Σ_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j])
  (the drop from the best accuracy a task ever had to its final accuracy; 0 when T = 1)

and for a pre-trained skill measured before training (``base``) and after each task (``scores``):

* :func:`retention` = scores / base (1.0 = fully kept), :func:`mean_cosine_similarity` for embedding drift.

and against a **frozen reference** — the same run with the pre-trained model left as loaded (only task heads
train), which every result needs: without it, a method that keeps old skills by not learning looks perfect:

* :func:`frozen_reference` gives that model: a copy of yours with every parameter frozen (add the task heads)
* :func:`plasticity` = ACC − ACC(frozen): what training the model added on the new tasks (≈ 0: it did not learn)
* :func:`plasticity_per_task` = R[j][j] − R_frozen[j][j]: the same for each task just after it was learned

The metric functions accept nested lists, NumPy arrays or tensors and raise :class:`ValueError` naming the
offending entry for a matrix that is not square, is empty, or has a non-finite entry on or below the diagonal.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = [
    "ContinualRunner",
    "ContinualResult",
    "as_accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "retention",
    "mean_cosine_similarity",
    "frozen_reference",
    "plasticity",
    "plasticity_per_task",
    "summarize",
]


# ------------------------------------------------------------------------------------------------ metrics


def as_accuracy_matrix(R) -> list[list[float]]:
    """Validate ``R`` and return it as a T x T list of floats (entries above the diagonal kept as given).

    Raises ValueError if ``R`` is empty or not square, or if an entry with ``i >= j`` is not a finite number.
    """
    if isinstance(R, torch.Tensor):
        R = R.detach().cpu().tolist()
    elif hasattr(R, "tolist"):
        R = R.tolist()
    try:
        rows = [list(r) for r in R]
    except TypeError as e:
        raise ValueError(f"accuracy matrix must be a 2-D sequence, got {type(R).__name__}") from e
    T = len(rows)
    if T == 0:
        raise ValueError("accuracy matrix is empty")
    for i, r in enumerate(rows):
        if len(r) != T:
            raise ValueError(f"accuracy matrix must be square: row {i} has {len(r)} entries, expected {T}")
    out = []
    for i, r in enumerate(rows):
        row = []
        for j, v in enumerate(r):
            if v is None and j > i:  # not evaluated (JSON has no NaN)
                row.append(math.nan)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"accuracy matrix entry R[{i}][{j}] = {v!r} is not a number") from e
            if j <= i and not math.isfinite(f):
                raise ValueError(f"accuracy matrix entry R[{i}][{j}] = {f} is not finite")
            row.append(f)
        out.append(row)
    return out


def average_accuracy(R) -> float:
    """ACC = 1/T · Σ_j R[T-1][j]: mean accuracy over all tasks after the last one."""
    R = as_accuracy_matrix(R)
    return sum(R[-1]) / len(R)


def backward_transfer(R) -> float:
    """BWT = 1/(T-1) · Σ_{j<T-1} (R[T-1][j] - R[j][j]); 0.0 for a single task."""
    R = as_accuracy_matrix(R)
    T = len(R)
    if T == 1:
        return 0.0
    return sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R, per_task: bool = False):
    """F = 1/(T-1) · Σ_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j]); 0.0 for a single task.

    With ``per_task=True`` returns the list of f_j (j < T-1) instead of their mean.
    """
    R = as_accuracy_matrix(R)
    T = len(R)
    f = [max(R[l][j] for l in range(j, T - 1)) - R[-1][j] for j in range(T - 1)]
    if per_task:
        return f
    return sum(f) / len(f) if f else 0.0


def retention(scores: Sequence[float], base: float) -> list[float]:
    """``[s / base for s in scores]``: the share of a pre-trained skill kept (1.0 = all of it)."""
    base = float(base)
    if not math.isfinite(base) or base == 0.0:
        raise ValueError(f"retention needs a finite, non-zero base score, got {base}")
    out = []
    for i, s in enumerate(scores):
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"retention score {i} = {s} is not finite")
        out.append(s / base)
    return out


def mean_cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i): how close embeddings ``a`` (N, d) stay to reference embeddings ``b``."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two (N, d) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with ``requires_grad=False`` on every parameter: the frozen reference of a
    continual run (train only the task heads you attach to it, with the same steps, head learning rate and seed
    as the method it is compared with). ``model`` itself is not changed."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"frozen_reference needs a torch.nn.Module, got {type(model).__name__}")
    import copy

    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference


def plasticity(R, R_frozen) -> float:
    """ACC(R) − ACC(R_frozen): accuracy gained by training the model, over a frozen reference run on the same
    tasks (same heads, steps and seed). Both matrices must have the same size."""
    R, R_frozen = as_accuracy_matrix(R), as_accuracy_matrix(R_frozen)
    if len(R) != len(R_frozen):
        raise ValueError(f"plasticity needs matrices of the same size, got {len(R)} and {len(R_frozen)} tasks")
    return average_accuracy(R) - average_accuracy(R_frozen)


def plasticity_per_task(R, R_frozen) -> list[float]:
    """[R[j][j] − R_frozen[j][j] for each task j]: how much better each task was learned than by the frozen
    reference, measured right after learning it (before any forgetting)."""
    R, R_frozen = as_accuracy_matrix(R), as_accuracy_matrix(R_frozen)
    if len(R) != len(R_frozen):
        raise ValueError(f"plasticity needs matrices of the same size, got {len(R)} and {len(R_frozen)} tasks")
    return [R[j][j] - R_frozen[j][j] for j in range(len(R))]


def summarize(R) -> dict[str, Any]:
    """ACC, BWT and forgetting of the full matrix, plus ACC after each task (``acc_per_step``)."""
    R = as_accuracy_matrix(R)
    T = len(R)
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "forgetting_per_task": forgetting(R, per_task=True),
        "acc_per_step": [average_accuracy([r[: t + 1] for r in R[: t + 1]]) for t in range(T)],
    }


# ------------------------------------------------------------------------------------------------- runner


@dataclass
class ContinualResult:
    """What :meth:`ContinualRunner.run` measured.

    ``R[i][j]``: score on task j after training task i (NaN where not evaluated). ``probes[name]``: the probe
    before any training, then after each task (length T + 1). ``train_seconds[t]``: wall time of
    ``train_fn`` + ``after_task`` for task t; ``eval_seconds[t]``: evaluation and probes after task t.
    ``train_info[t]``: whatever ``train_fn`` returned for task t.
    """

    task_names: list[str]
    R: list[list[float]]
    probes: dict[str, list[float]] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    train_info: list[Any] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """:func:`summarize` of ``R``."""
        return summarize(self.R)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["R"] = [[None if math.isnan(v) else v for v in row] for row in self.R]  # JSON has no NaN
        d["metrics"] = self.metrics()
        return d


def _task_name(task, t: int) -> str:
    return str(getattr(task, "name", None) or (task.get("name") if isinstance(task, Mapping) else None) or f"task{t}")


def _check_score(kind: str, value, where: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind} returned {value!r} for {where}; expected a number") from e
    if not math.isfinite(f):
        raise ValueError(f"{kind} returned {f} for {where}; expected a finite number")
    return f


class ContinualRunner:
    """Train on a sequence of tasks; after each, consolidate and evaluate on every task seen so far.

    Args:
        tasks: the task sequence (any objects; a ``name`` attribute or key is used for reporting).
        train_fn: ``train_fn(t, task)`` trains on task t; its return value is kept in ``train_info``.
        eval_fn: ``eval_fn(j, task) -> float`` scores the current model on task j (e.g. test accuracy).
        after_task: ``after_task(t, task)`` runs after training task t and before evaluation (e.g.
            ``taillor.consolidate(model)`` and freezing task t's head). Optional.
        probes: ``{name: fn() -> float}`` measured before training and after each task (pre-trained skills,
            drift). Optional.
        eval_future: also evaluate tasks not trained yet (fills R above the diagonal). Default False.
        log: ``log(str)`` for one line per task (e.g. ``print`` or ``tqdm.write``). Optional.
    """

    def __init__(
        self,
        tasks: Sequence[Any],
        train_fn: Callable[[int, Any], Any],
        eval_fn: Callable[[int, Any], float],
        after_task: Callable[[int, Any], None] | None = None,
        probes: Mapping[str, Callable[[], float]] | None = None,
        eval_future: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("ContinualRunner needs at least one task, got an empty sequence")
        for name, fn in (("train_fn", train_fn), ("eval_fn", eval_fn)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if after_task is not None and not callable(after_task):
            raise TypeError(f"after_task must be callable or None, got {type(after_task).__name__}")
        self.train_fn, self.eval_fn, self.after_task = train_fn, eval_fn, after_task
        self.probes = dict(probes or {})
        for name, fn in self.probes.items():
            if not callable(fn):
                raise TypeError(f"probe {name!r} must be callable, got {type(fn).__name__}")
        self.eval_future = eval_future
        self.log = log

    def _run_probes(self, result: ContinualResult, when: str) -> None:
        for name, fn in self.probes.items():
            result.probes[name].append(_check_score(f"probe {name!r}", fn(), when))

    def run(self) -> ContinualResult:
        T = len(self.tasks)
        names = [_task_name(task, t) for t, task in enumerate(self.tasks)]
        result = ContinualResult(names, [[math.nan] * T for _ in range(T)], {k: [] for k in self.probes})
        self._run_probes(result, "the model before training")
        for t, task in enumerate(self.tasks):
            t0 = time.perf_counter()
            result.train_info.append(self.train_fn(t, task))
            if self.after_task is not None:
                self.after_task(t, task)
            t1 = time.perf_counter()
            for j in range(T if self.eval_future else t + 1):
                result.R[t][j] = _check_score("eval_fn", self.eval_fn(j, self.tasks[j]),
                                              f"task {j} ({names[j]}) after task {t} ({names[t]})")
            self._run_probes(result, f"after task {t} ({names[t]})")
            result.train_seconds.append(t1 - t0)
            result.eval_seconds.append(time.perf_counter() - t1)
            if self.log is not None:
                accs = " ".join(f"{result.R[t][j]:.3f}" for j in range(t + 1))
                extra = " ".join(f"{k}={v[-1]:.3f}" for k, v in result.probes.items())
                self.log(f"after task {t + 1}/{T} ({names[t]}): acc [{accs}] {extra}".rstrip())
        return result
