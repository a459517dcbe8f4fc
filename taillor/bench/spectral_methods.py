"""What the spectral suites compare: taillor.randomized_svd against torch.svd_lowrank and torch.linalg.svd, the
spectral projection against plain matmuls, the penalty's Gram form against materializing ΔW, and
taillor.build_frames against a loop of svd_lowrank over a whole model's weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from dataclasses import replace as dataclasses_replace
from typing import Callable

import torch
from torch import Tensor

from ..config import TailLoRConfig
from ..frame import build_frames, clear_frame_cache, head_svd_settings, head_uses_exact_svd
from ..functional import randomized_svd, spectral_penalty, spectral_projection
from .metrics import max_principal_angle, sigma_rel_error
from .shapes import FramesModel, PenaltyCase, ProjectionCase, SvdCase


def spectrum_matrix(m: int, n: int, decay: float, seed: int = 0, device="cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(W, σ): an m×n matrix with singular values σ_i = (1 + i)^-decay and random orthonormal singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64).to(device)).Q
    Q2 = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64).to(device)).Q
    sigma = (1.0 + torch.arange(k, dtype=torch.float64, device=device)) ** -decay
    return ((Q1 * sigma) @ Q2.mT).to(dtype), sigma


SVD_METHODS = ("taillor", "svd_lowrank", "linalg.svd")
SVD_LABELS = {"taillor": "taillor.randomized_svd", "svd_lowrank": "torch.svd_lowrank (same sketch)",
              "linalg.svd": "torch.linalg.svd (exact)"}


def svd_functions(case: SvdCase) -> dict[str, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]]:
    q = min(case.k + case.oversample, case.m, case.n)

    def ours(W):
        return randomized_svd(W, case.k, niter=case.niter, oversample=case.oversample, seed=0)

    def lowrank(W):
        U, S, V = torch.svd_lowrank(W, q=q, niter=case.niter)
        return U[:, :case.k], S[:case.k], V[:, :case.k]

    def exact(W):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :case.k], S[:case.k], Vh[:case.k].mT

    return {"taillor": ours, "svd_lowrank": lowrank, "linalg.svd": exact}



def projection_functions(case: ProjectionCase, device: torch.device, seed: int = 0):
    """(ours, matmul, params): closures computing (P, Q) of one full-frame layer, taillor.spectral_projection and
    the same two products as plain autograd matmuls; params are the trainable factors A (r, k), B (k, r)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(case.d_in, case.d_out)
    U = torch.linalg.qr(torch.randn(case.d_out, k, generator=gen)).Q.to(device)
    V = torch.linalg.qr(torch.randn(case.d_in, k, generator=gen)).Q.to(device)
    A = (torch.randn(case.rank, k, generator=gen) / math.sqrt(k)).to(device).requires_grad_(True)
    B = (torch.randn(k, case.rank, generator=gen) * 1e-2).to(device).requires_grad_(True)
    out_dtype = getattr(torch, case.out_dtype)

    def ours():
        return spectral_projection(A, B, U, V, out_dtype=out_dtype)

    def matmul():
        return (V @ A.t()).to(out_dtype), (U @ B).to(out_dtype)

    return ours, matmul, [A, B]


def penalty_functions(case: PenaltyCase, device: torch.device, seed: int = 0):
    """(gram, naive, params): closures computing the penalty of one layer; gram and naive compute the same value."""
    gen = torch.Generator().manual_seed(seed)
    d, r = case.d, case.rank
    W, _ = spectrum_matrix(d, d, 0.5, seed=seed, device=device)
    U, S, Vh = torch.linalg.svd(W.double())
    U, V = U.float(), Vh.mT.float()
    h = case.head if case.frame == "head" else max(1, d // 10)
    omega2 = (torch.arange(d, device=device) < h).float() if case.frame == "full" else torch.ones(h, device=device)
    lam, scaling = 1e-3, 2.0
    coeff = lam * scaling ** 2
    A = (torch.randn(r, d, generator=gen) / math.sqrt(d)).to(device).requires_grad_(True)
    B = (torch.randn(d, r, generator=gen) * 1e-2).to(device).requires_grad_(True)
    Uh, Vh_ = (None, None) if case.frame == "full" else (U[:, :h].contiguous(), V[:, :h].contiguous())
    omega = omega2.sqrt()

    def gram():
        return spectral_penalty(A, B, Uh, Vh_, omega2, coeff)

    def naive():
        if case.frame == "full":
            delta = scaling * (U @ B) @ (A @ V.t())
            omega_U, omega_V = U * omega, V * omega
        else:
            delta = scaling * B @ A
            omega_U, omega_V = Uh * omega, Vh_ * omega
        return lam * ((omega_U.t() @ delta).pow(2).sum() + (delta @ omega_V).pow(2).sum())

    return gram, naive, [A, B]



def model_weights(model: FramesModel, device: torch.device, decay: float = 0.5, seed: int = 0) -> dict[str, Tensor]:
    """Random fp32 weights with singular values σ_i = (1 + i)^-decay for every target of ``model``.

    One template per distinct shape (exact spectrum, random singular vectors); each layer gets it with its rows
    and columns randomly permuted and sign-flipped — orthogonal transforms, so the spectrum is the same, the
    singular vectors differ and every weight is distinct (no frame-cache hits).
    """
    gen = torch.Generator().manual_seed(seed)
    templates: dict[tuple[int, int], Tensor] = {}
    weights = {}
    for name, (d_out, d_in) in model.shapes().items():
        if (d_out, d_in) not in templates:
            if (d_in, d_out) in templates:
                templates[(d_out, d_in)] = templates[(d_in, d_out)].t().contiguous()
            else:
                templates[(d_out, d_in)] = spectrum_matrix(d_out, d_in, decay, seed=len(templates) + seed,
                                                           device=device)[0]
        T = templates[(d_out, d_in)]
        rows = torch.randperm(d_out, generator=gen).to(device)
        cols = torch.randperm(d_in, generator=gen).to(device)
        rs = (torch.randint(0, 2, (d_out, 1), generator=gen) * 2 - 1).to(device, T.dtype)
        cs = (torch.randint(0, 2, (1, d_in), generator=gen) * 2 - 1).to(device, T.dtype)
        weights[name] = (T[rows][:, cols] * rs * cs).contiguous()
    return weights


class FramesBench:
    """The frames comparison on one model: ``ours`` (taillor.build_frames, head mode, h = model.head), ``lowrank``
    (a loop of torch.svd_lowrank with the same sketch q = h + oversample and niter per matrix) and
    ``exact_layer0`` (torch.linalg.svd of layer 0's matrices). Each returns {name: (U, S, V)} truncated to h.
    Errors are measured on layer 0 against the exact SVD."""

    def __init__(self, model: FramesModel, device: torch.device):
        self.model = model
        self.device = device
        self.config = TailLoRConfig(frame="head", head=model.head)
        self.weights = model_weights(model, device)
        self.layer0 = {name: W for name, W in self.weights.items() if name.startswith("layers.0.")}
        self.oversample, self.niter = head_svd_settings(model.head, self.config)
        self.n_exact = sum(1 for W in self.weights.values()
                           if head_uses_exact_svd(model.head, min(W.shape), self.config))

    def ours(self) -> dict:
        clear_frame_cache()  # every call computes every frame (no cache hits across rounds)
        frames = build_frames(self.weights, self.config)
        return {name: (f.U, f.S, f.V) for name, f in frames.items()}

    def lowrank(self) -> dict:
        return self._lowrank(self.weights)

    def lowrank_layer0(self) -> dict:
        return self._lowrank(self.layer0)

    def _lowrank(self, weights: dict) -> dict:
        h, out = self.model.head, {}
        for name, W in weights.items():
            U, S, V = torch.svd_lowrank(W, q=min(h + self.oversample, *W.shape), niter=self.niter)
            out[name] = (U[:, :h], S[:h], V[:, :h])
        return out

    def exact_layer0(self) -> dict:
        h, out = self.model.head, {}
        for name, W in self.layer0.items():
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            out[name] = (U[:, :h], S[:h], Vh[:h].mT)
        return out

    def warmup(self) -> None:
        """First-call costs (lazy LAPACK/cuSOLVER set-up: seconds for the first svd_lowrank) on small matrices."""
        small = {f"warmup.{i}": W for i, W in enumerate(model_weights(FramesModel("warmup", 1, 256, 512, 64, 16),
                                                                        self.device).values())}
        clear_frame_cache()
        build_frames(small, dataclasses_replace(self.config, head=16))
        for W in small.values():
            torch.svd_lowrank(W, q=48, niter=self.niter)
            torch.linalg.svd(W, full_matrices=False)
        clear_frame_cache()

    def errors(self, result: dict, exact: dict) -> tuple[float, float]:
        """(max σ relative error, max principal angle of V) over layer 0's matrices."""
        return (max(sigma_rel_error(result[n][1], exact[n][1]) for n in self.layer0),
                max(max_principal_angle(result[n][2], exact[n][2]) for n in self.layer0))

    def describe(self) -> dict:
        return {"shape": self.model.name, **asdict(self.model), "device": self.device.type,
                "matrices": len(self.weights), "oversample": self.oversample, "niter": self.niter,
                "matrices_exact_in_build_frames": self.n_exact}
