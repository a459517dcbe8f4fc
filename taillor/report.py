"""Spectral report: where in each weight's spectrum the learned update went.

For a layer with pre-trained weight W = U diag(σ) Vᵀ, head size h and everything learned so far ΔW
(consolidated tasks plus the current adapter):

* ``head_share_left``  = ‖U_hᵀ ΔW‖_F² / ‖ΔW‖_F²   (share of the update's energy in the top-h output directions)
* ``head_share_right`` = ‖ΔW V_h‖_F² / ‖ΔW‖_F²    (... in the top-h input directions)
* ``stable_rank_before`` = ‖W‖_F² / ‖W‖_2² and ``stable_rank_after`` = the same for W + ΔW
* ``delta_norm`` = ‖ΔW‖_F and ``relative_delta`` = ‖ΔW‖_F / ‖W‖_F

An update with no preference for any direction puts about h/m of its energy in the head (``uniform_share``); TailLoR
aims well below that, plain LoRA and full fine-tuning usually land near or above it. The same numbers for any
pair of weights (a PEFT LoRA or a fully fine-tuned model against its base) come from :func:`spectral_shares`.

Usage::

    rows = taillor.spectral_report(model)               # list[SpectralRow], one per TailLoR layer
    print(format_spectral_report(rows))
    plot_spectral_report(rows, "spectral.png")          # needs matplotlib
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .model import iter_taillor_layers

__all__ = [
    "SpectralRow",
    "spectral_shares",
    "spectral_report",
    "spectral_report_from_weights",
    "linear_weights",
    "format_spectral_report",
    "plot_spectral_report",
]


@dataclass(frozen=True)
class SpectralRow:
    """One layer of a spectral report (see the module docstring for the definitions)."""

    name: str
    d_out: int
    d_in: int
    head_size: int
    head_share_left: float
    head_share_right: float
    uniform_share: float
    stable_rank_before: float
    stable_rank_after: float
    delta_norm: float
    relative_delta: float

    def to_dict(self) -> dict:
        return asdict(self)


def _stable_rank(W: Tensor) -> float:
    s = torch.linalg.svdvals(W)
    return float((s ** 2).sum() / (s[0] ** 2)) if float(s[0]) > 0 else 0.0


@torch.no_grad()
def spectral_shares(name: str, pretrained: Tensor, delta: Tensor, head_size: int,
                    U: Tensor | None = None, V: Tensor | None = None) -> SpectralRow:
    """The report row for one layer from its pre-trained weight (d_out, d_in) and learned update ΔW (same shape).

    ``U`` (d_out, ≥h) and ``V`` (d_in, ≥h), the pre-trained singular vectors, are computed (exact SVD, float64)
    when not given. Raises ValueError for mismatched shapes or a head outside [1, min(d_out, d_in)).
    """
    if pretrained.dim() != 2 or pretrained.shape != delta.shape:
        raise ValueError(f"{name}: pretrained {tuple(pretrained.shape)} and delta {tuple(delta.shape)} must be "
                         "2-D and of the same shape")
    d_out, d_in = pretrained.shape
    m = min(d_out, d_in)
    if not 1 <= int(head_size) < m:
        raise ValueError(f"{name}: head_size={head_size} must satisfy 1 <= h < min(d_out, d_in)={m}")
    h = int(head_size)
    W = pretrained.detach().double().cpu()
    D = delta.detach().double().cpu()
    if U is None or V is None or U.shape[1] < h or V.shape[1] < h:
        U_full, _, Vh = torch.linalg.svd(W, full_matrices=False)
        U, V = U_full, Vh.t()
    U_h = U[:, :h].double().cpu()
    V_h = V[:, :h].double().cpu()
    total = float((D ** 2).sum())
    if total > 0:
        left = float(((U_h.t() @ D) ** 2).sum()) / total
        right = float(((D @ V_h) ** 2).sum()) / total
    else:
        left = right = 0.0
    w_norm = float(W.norm())
    return SpectralRow(
        name=name, d_out=d_out, d_in=d_in, head_size=h,
        head_share_left=left, head_share_right=right, uniform_share=h / m,
        stable_rank_before=_stable_rank(W), stable_rank_after=_stable_rank(W + D),
        delta_norm=total ** 0.5, relative_delta=(total ** 0.5) / w_norm if w_norm > 0 else 0.0,
    )


def spectral_report(model: nn.Module) -> list[SpectralRow]:
    """One :class:`SpectralRow` per TailLoR layer of ``model`` (in module order), ΔW = ``layer.learned_delta()``.

    Uses the layer's own frame for U_h and V_h. Raises ValueError if the model has no TailLoR layer.
    """
    rows = []
    for name, layer in iter_taillor_layers(model):
        with torch.no_grad():
            W0 = layer.pretrained_weight()
            D = layer.learned_delta()
        rows.append(spectral_shares(name, W0, D, layer.head_size, layer.frame.U, layer.frame.V))
    if not rows:
        raise ValueError("spectral_report: the model has no TailLoR layers (call taillor.apply_taillor first)")
    return rows


def spectral_report_from_weights(pretrained: Mapping[str, Tensor], current: Mapping[str, Tensor],
                                 head: int | float) -> list[SpectralRow]:
    """Rows for any fine-tuning method: ΔW = current[name] - pretrained[name] for every name of ``pretrained``.

    ``head`` is a count or a fraction of min(d_out, d_in) (rounded as TailLoRConfig does).
    """
    rows = []
    for name, W0 in pretrained.items():
        if name not in current:
            raise ValueError(f"spectral_report_from_weights: {name!r} is missing from the current weights")
        m = min(W0.shape)
        h = head if isinstance(head, int) else int(round(head * m))
        rows.append(spectral_shares(name, W0, current[name].detach().to(W0.dtype) - W0, h))
    return rows


def linear_weights(model: nn.Module, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    """{name: float32 copy of the weight} of every ``nn.Linear`` of ``model`` whose qualified name ``keep`` accepts:
    the ``pretrained`` (or ``current``) argument of :func:`spectral_report_from_weights`, taken before training."""
    return {name: module.weight.detach().float().clone() for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and keep(name)}


def format_spectral_report(rows: Sequence[SpectralRow]) -> str:
    """A plain-text table of the rows plus their mean."""
    lines = [f"{'layer':<44} {'h':>4} {'head% L':>8} {'head% R':>8} {'uniform%':>8} "
             f"{'srank W':>8} {'srank W+dW':>10} {'|dW|/|W|':>9}"]
    for r in rows:
        lines.append(f"{r.name[-44:]:<44} {r.head_size:>4} {100 * r.head_share_left:>8.2f} "
                     f"{100 * r.head_share_right:>8.2f} {100 * r.uniform_share:>8.2f} {r.stable_rank_before:>8.2f} "
                     f"{r.stable_rank_after:>10.2f} {r.relative_delta:>9.4f}")
    if rows:
        n = len(rows)
        mean = lambda attr: sum(getattr(r, attr) for r in rows) / n  # noqa: E731
        lines.append(f"{'mean':<44} {'':>4} {100 * mean('head_share_left'):>8.2f} "
                     f"{100 * mean('head_share_right'):>8.2f} {100 * mean('uniform_share'):>8.2f} "
                     f"{mean('stable_rank_before'):>8.2f} {mean('stable_rank_after'):>10.2f} "
                     f"{mean('relative_delta'):>9.4f}")
    return "\n".join(lines)


def _short(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1]}" if layer else parts[-1]


def plot_spectral_report(rows: Sequence[SpectralRow] | Mapping[str, Sequence[SpectralRow]], path: str,
                         title: str = "Spectral report") -> str:
    """Write a PNG: per layer, the share of ‖ΔW‖² in the head (left/right) and the stable ranks.

    ``rows`` is one report or ``{method: report}`` to compare methods layer by layer. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = dict(rows) if isinstance(rows, Mapping) else {"TailLoR": list(rows)}
    if not reports or not any(reports.values()):
        raise ValueError("plot_spectral_report: nothing to plot")
    first = next(iter(reports.values()))
    names = [_short(r.name) for r in first]
    x = torch.arange(len(first)).numpy()
    width = 0.8 / len(reports)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.55 * len(first) * 2 + 4), 4.2))
    ax = axes[0]
    for i, (method, rep) in enumerate(reports.items()):
        share = [100 * 0.5 * (r.head_share_left + r.head_share_right) for r in rep]
        ax.bar(x + (i - (len(reports) - 1) / 2) * width, share, width, label=method)
    ax.plot(x, [100 * r.uniform_share for r in first], "k--", lw=1, label="uniform (h/m)")
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    top = max([100 * 0.5 * (r.head_share_left + r.head_share_right) for rep in reports.values() for r in rep]
              + [100 * first[0].uniform_share])
    ax.set_ylim(0, 1.45 * top)  # room for the legend
    ax.set_ylabel("share of ||ΔW||² in the head (%)\n(mean of left and right)")
    ax.set_title("Where the update went")
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax = axes[1]
    for i, (method, rep) in enumerate(reports.items()):
        change = [100 * (r.stable_rank_after - r.stable_rank_before) / r.stable_rank_before
                  if r.stable_rank_before else 0.0 for r in rep]
        ax.bar(x + (i - (len(reports) - 1) / 2) * width, change, width, label=method)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{nm}\n({r.stable_rank_before:.0f})" for nm, r in zip(names, first)], rotation=60,
                  fontsize=7)
    ax.set_ylabel("change of stable rank, W → W + ΔW (%)")
    ax.set_title("Stable rank ||W||_F² / ||W||_2² (pre-trained value in brackets)")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
