"""The operand orders that CPU BLAS (MKL) runs fastest for the adapter's rank-r products.

Both helpers return the same values as the plain product (up to float rounding) on every device. They only
choose how the product is computed on the CPU, where MKL's speed depends on the shape far more than the FLOPs do:

* ``narrow_matmul(a, b)`` = a @ b for b (K, N) with N ≤ 8. MKL's narrow-output path ran 1.5-3x slower than the
  transposed product (bᵀ aᵀ)ᵀ for N in 2..8 (1 thread: 147 vs 43 µs at 256×384·384×8, 2986 vs 1031 µs at
  2048×1024·1024×8; 2 threads: 95 vs 42 µs and 1676 vs 1103 µs). At N = 12 the faster form depended on the thread
  count; at N = 16, 32 and 64 the plain product was as fast or faster, so it is kept there.
* ``reduce_rows(a, b)`` = aᵀ b for a (T, r), b (T, d): the weight-gradient reduction over tokens. With r ≪ d
  MKL splits it over d only. With several threads, splitting the T reduction across them (a batched GEMM, one
  slice of tokens each) and summing the (threads, r, d) partials ran ~1.3x faster; with one thread the split only
  adds the sum, so the plain product is kept.
"""
from __future__ import annotations

import torch
from torch import Tensor

NARROW = 8  # output widths up to this take the transposed form on the CPU


def narrow_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b, (M, K)·(K, N) -> (M, N) contiguous, for a small N (a rank)."""
    if a.device.type != "cpu" or b.shape[1] > NARROW:
        return a @ b
    return (b.t() @ a.t()).t().contiguous()


def reduce_rows(a: Tensor, b: Tensor) -> Tensor:
    """aᵀ b, (T, r)ᵀ·(T, d) -> (r, d)."""
    chunks = torch.get_num_threads() if a.device.type == "cpu" else 1
    T = a.shape[0]
    if chunks < 2 or T % chunks or T // chunks < 256:
        return a.t() @ b
    return torch.bmm(a.view(chunks, T // chunks, -1).transpose(1, 2), b.view(chunks, T // chunks, -1)).sum(0)
