"""protect_tasks: the directions of the finished tasks, which the penalty protects next to the pre-trained head.

Everything the finished tasks learned is ΔW_done = consolidated_up · consolidated_down. Its column and row spaces
(orthonormal bases Q_U, Q_V, as many columns as its numerical rank: at most r per task) are protected softly, in
the head penalty's Gram form, with the weight μ = ``protect_tasks_weight``:

    E_tasks = ‖Q_Uᵀ ΔW‖²_F + ‖ΔW Q_V‖²_F

which is the head-frame penalty op with U_h := Q_U, V_h := Q_V and ω² = 1 (in the full frame Q_U and Q_V are
expressed in spectral coordinates, Uᵀ Q_U and Vᵀ Q_V, exact because U and V have orthonormal columns). Bases of
the *sum* of the finished updates (not one QR per task): overlapping tasks are not counted twice, a task that
learned nothing adds no direction, and E_tasks ≤ 2‖ΔW‖²_F, so the adapted strength's share stays meaningful.
"""
from __future__ import annotations

import torch
from torch import Tensor


def update_bases(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal bases (left (m, q), right (n, q)) of the column and row spaces of the update up·down (up (m, R),
    down (R, n)), q its numerical rank: singular values above σ_max·max(m, n)·eps of up's dtype (numpy's
    matrix_rank rule), so a zero or rank-deficient update adds no spurious directions. Via QR of each factor and
    an SVD of the R×R core (never the m×n product), in float64; returned in up's dtype."""
    m, n = up.shape[0], down.shape[1]
    if up.shape[1] == 0:
        return up.new_zeros(m, 0), up.new_zeros(n, 0)
    Q_left, R_left = torch.linalg.qr(up.double())
    Q_right, R_right = torch.linalg.qr(down.double().t())
    U_core, S, Vh_core = torch.linalg.svd(R_left @ R_right.t())
    q = int((S > float(S[0]) * max(m, n) * torch.finfo(up.dtype).eps).sum())
    return ((Q_left @ U_core[:, :q]).to(up.dtype).contiguous(),
            (Q_right @ Vh_core[:q].t()).to(up.dtype).contiguous())
