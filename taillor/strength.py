"""The penalty's strength λ: fixed, or adapted per layer so that the head holds a target share of the update.

Why a target. With Adam, a fixed λ's effect is not a property of λ: a head coordinate settles where the task
gradient g balances the penalty's pull 2λs²·b, i.e. near b ≈ g / (2λs²), while the unpenalized tail grows like
lr × steps. Which of the two wins — the head shut (the model barely learns), or open (it forgets like LoRA) —
depends on the loss scale, the layer, s = alpha/r, the learning rate and the training length. Measured on the demo,
λ = 1e-3 did nothing and λ = 10 froze short runs.

The share of the update's energy that lands in the pre-trained head is scale-free:

    share(ΔW) = (‖Ω_Uᵀ ΔW‖²_F + ‖ΔW Ω_V‖²_F) / (2‖ΔW‖²_F)   ∈ [0, 1]

(the left and right ω²-weighted head energies, averaged; for ``penalty_weighting="head"`` it is the mean of
the spectral report's head shares, and an update that ignores the spectrum has share ≈ h/m). With
``head_share_target=ρ`` each layer keeps its own λ_l and takes one dual-ascent step per optimizer step:

    log λ_l ← log λ_l + η · clamp(log(share_l / ρ), −2, 2),      η = HEAD_SHARE_GAIN

so λ_l rises while the head holds more than ρ of the layer's update and falls while it holds less: the smallest
strength that meets the target, found for this layer, loss and optimizer, within 1e-6..1e2 times the starting
λ. The penalty that enters the loss is still the reference formula, λ_l · (‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²): the new
form equals it with λ = λ_l.

With ``protect_tasks`` the finished tasks' directions join the head, weighted by μ = ``protect_tasks_weight``: the
penalty is λ_l·(E_head + μ·E_tasks) and the share the dual step targets is (E_head + μ·E_tasks) / (2‖ΔW‖²), so one
strength keeps the update out of both. (E_tasks ≤ 2‖ΔW‖²: the task bases are orthonormal.)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Dual-ascent gain: log λ moves by at most 2η = 0.4 a step (×1.5), so λ can cross four decades in ~25 steps and
# short runs still reach their target, while one noisy step cannot move it by more than that factor.
HEAD_SHARE_GAIN = 0.2
_LOG_RATIO_CLAMP = 2.0
# λ_l stays within these multiples of the starting λ (``penalty``). The floor keeps log λ finite while the head is
# unused. The ceiling is anti-windup: some targets cannot be met — in the head frame A and B live in the layer's
# coordinates, and Adam's per-coordinate steps put a floor under the share that no λ removes — and an
# ever-growing λ then drowns the task gradient (with gradient clipping, every other parameter's too: measured,
# a head-frame run with ρ = 0.002 fell below the frozen reference). Healthy runs of the demos settled at
# λ_l ≈ 0.01–3 from a start of 1.
STRENGTH_RANGE = (1e-6, 1e2)


def head_share(weighted_energy: Tensor, total_energy: Tensor) -> Tensor:
    """share = weighted / (2·total), 0 where the update is zero; 0-dim tensors in, 0-dim tensor out."""
    return torch.where(total_energy > 0, weighted_energy / (2 * total_energy).clamp_min(torch.finfo(
        total_energy.dtype).tiny), torch.zeros_like(total_energy))


def dual_step(strength: Tensor, energy: Tensor, total: Tensor, changed: Tensor, target: float, start: float) -> None:
    """One dual-ascent step of ``strength`` (a 0-dim tensor, updated in place) towards ``share == target``, with
    share = energy / (2·total) (0-dim tensors: the weighted energy and ‖ΔW‖², in any common scale), taken only where
    ``changed`` (a 0-dim bool tensor: the adapter changed since the last step) and ``total > 0`` (the share of a
    zero update is undefined), and kept within ``STRENGTH_RANGE`` times ``start`` (the starting λ). Tensor ops
    only, as few as the formula allows (they are most of the adaptive penalty's cost on a CPU): no host
    synchronisation, and torch.compile traces it.
    """
    # log(share / ρ) = log(energy / (2ρ·total)), its argument clamped at e^-2 (a zero share, or a tiny negative
    # energy from rounding, is a step of −2η); a zero total gives NaN here, masked below.
    ratio = torch.log(torch.clamp_min(energy / (total * (2.0 * target)), math.exp(-_LOG_RATIO_CLAMP)))
    step = ratio.clamp_max(_LOG_RATIO_CLAMP).mul_(HEAD_SHARE_GAIN).to(strength.dtype)
    low, high = STRENGTH_RANGE
    new = (strength.log() + step).exp_().clamp_(low * start, high * start)
    strength.copy_(torch.where(changed & (total > 0), new, strength))


def dual_step_value(strength: float, energy: float, total: float, target: float, start: float) -> float:
    """:func:`dual_step` on host numbers, for a CPU layer outside compiled code (reading a CPU tensor costs no
    synchronisation, and a handful of 0-dim tensor ops cost more than the penalty's own Gram products): the new λ
    for ``total > 0`` (the caller skips the step otherwise)."""
    ratio = math.log(max(energy / (2.0 * target * total), math.exp(-_LOG_RATIO_CLAMP)))
    low, high = STRENGTH_RANGE
    new = math.exp(math.log(strength) + HEAD_SHARE_GAIN * min(ratio, _LOG_RATIO_CLAMP))
    return min(max(new, low * start), high * start)


@torch.no_grad()
def adapt_strength(strength: Tensor, seen: Tensor, energy: Tensor, total: Tensor, target: float,
                   start: float) -> None:
    """A layer's dual step: ``strength`` (0-dim) steps towards ``target`` if (energy, total) (0-dim, detached) differ
    from ``seen`` (2,), the pair of the last step (NaN before the first), which is then updated. Both come out of
    one penalty kernel, so the same A, B give the same bits in eager and compiled code, and a second call within
    one optimizer step (gradient accumulation) changes nothing. On a CPU outside compiled code the check and the
    step run on host numbers: the same formula, a few tensor ops fewer."""
    if energy.device.type == "cpu" and not torch.compiler.is_compiling():
        e, t = float(energy), float(total)
        if [e, t] == seen.tolist():
            return
        seen.copy_(torch.stack((energy, total)))
        if t > 0:
            strength.fill_(dual_step_value(float(strength), e, t, target, start))
        return
    pair = torch.stack((energy, total))
    changed = (pair != seen).any()
    seen.copy_(pair)
    dual_step(strength, energy, total, changed, target, start)
