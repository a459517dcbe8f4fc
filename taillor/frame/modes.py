"""The two frame modes, one small object each: where the adapter's factors live and what that implies.

* :data:`FULL` (``frame="full"``, the paper's form): the frame is the complete thin SVD (k = min(d_out, d_in));
  A (r, k) and B (k, r) live in spectral coordinates, ΔW = s·U B A Vᵀ, so the layer factors are P = V Aᵀ and
  Q = U B (one projection per step), and the penalty's ω covers every coordinate of A and B directly.
* :data:`HEAD` (``frame="head"``, for large models): the frame holds the top-h triplets only; A (r, d_in) and
  B (d_out, r) live in the layer's own coordinates, ΔW = s·B A, so P = Aᵀ and Q = B, and the penalty needs U_h
  and V_h to see B and A in the head coordinates.

Each mode knows how to turn (A, B) into the layer factors (P, Q) and back, which frame tensors its penalty needs,
the shapes of A and B, how to initialise A (``init="tail"``: no component on the head), and how many triplets its
frame keeps. The layer, the frame builder and io ask their mode object; none compares the mode's name.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..functional import spectral_projection
from .spectral import SpectralFrame


class FrameMode:
    """The behaviour of one frame mode (see the module docstring); use :data:`FULL`, :data:`HEAD` or
    :func:`frame_mode`."""

    name: str = ""
    full_spectrum: bool = False  # the frame holds every singular triplet, not only the top h

    def frame_rank(self, m: int, h: int) -> int:
        """k, the frame's number of triplets, for a weight with m = min(d_out, d_in) and head size h."""
        return m if self.full_spectrum else h

    def factor_shapes(self, rank: int, frame_rank: int, d_in: int,
                      d_out: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(shape of A, shape of B) for adapter rank r."""
        raise NotImplementedError

    def layer_factors(self, A: Tensor, B: Tensor, frame: SpectralFrame,
                      dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """(P, Q) with ΔW = s·Q Pᵀ: P (d_in, r), Q (d_out, r) in ``dtype`` (default: A's); differentiable."""
        raise NotImplementedError

    def trainable_factors(self, P: Tensor, Q: Tensor, frame: SpectralFrame) -> tuple[Tensor, Tensor]:
        """(A, B) whose layer factors are (P, Q): the inverse of :meth:`layer_factors` (exact while P, Q lie in the
        frame's span, as every P, Q this mode produced do)."""
        raise NotImplementedError

    def penalty_frame(self, frame: SpectralFrame) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(U, V) as the penalty ops take them: the head bases as stored (the ops read a 16-bit frame in the
        adapter's dtype themselves, so that autograd keeps the stored frame for the backward, not a wider copy of
        every layer's), or (None, None) when A and B are already in spectral coordinates."""
        raise NotImplementedError

    def initial_A(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, seed: int, init: str,
                  frame: SpectralFrame) -> Tensor:
        """A new A: Kaiming-uniform (as nn.Linear and PEFT) from a CPU generator seeded with ``seed`` (the same
        values on every device), without its head component when ``init="tail"``."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5))
        A = torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator).to(device)
        return self.without_head(A, frame) if init == "tail" else A

    def without_head(self, A: Tensor, frame: SpectralFrame) -> Tensor:
        """A with no component on the frame's head coordinates."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"FrameMode({self.name!r})"


class FullFrame(FrameMode):
    name = "full"
    full_spectrum = True

    def factor_shapes(self, rank, frame_rank, d_in, d_out):
        return (rank, frame_rank), (frame_rank, rank)

    def layer_factors(self, A, B, frame, dtype=None):
        if frame.U.dtype != A.dtype:
            # A frame stored in 16 bits: project in its dtype (A and B rounded to it), so that autograd saves the
            # stored frame for backward rather than a float32 copy of it.
            storage = frame.U.dtype
            return spectral_projection(A.to(storage), B.to(storage), frame.U, frame.V, out_dtype=dtype or A.dtype)
        return spectral_projection(A, B, frame.U, frame.V, out_dtype=dtype)

    def trainable_factors(self, P, Q, frame):
        return P.t() @ frame.V.to(P.dtype), frame.U.to(Q.dtype).t() @ Q

    def penalty_frame(self, frame):
        return None, None

    def without_head(self, A, frame):
        A[:, :frame.head_size] = 0
        return A


class HeadFrame(FrameMode):
    name = "head"
    full_spectrum = False

    def factor_shapes(self, rank, frame_rank, d_in, d_out):
        return (rank, d_in), (d_out, rank)

    def layer_factors(self, A, B, frame, dtype=None):
        P, Q = A.t(), B
        return (P, Q) if dtype is None else (P.to(dtype), Q.to(dtype))

    def trainable_factors(self, P, Q, frame):
        return P.t(), Q

    def penalty_frame(self, frame):
        return frame.U, frame.V

    def without_head(self, A, frame):
        V_h = frame.V.to(A.dtype)
        return A - (A @ V_h) @ V_h.t()


FULL = FullFrame()
HEAD = HeadFrame()
MODES = {mode.name: mode for mode in (FULL, HEAD)}


def frame_mode(name: str) -> FrameMode:
    """The mode object of ``TailLoRConfig.frame`` ("full" | "head")."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown frame mode {name!r}; known: {sorted(MODES)}") from None
