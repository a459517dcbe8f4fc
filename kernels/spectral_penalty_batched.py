"""Triton kernel: the spectral penalty of L same-shaped layers at once, and each update's energy ‖B A‖².

Math (per layer l; notation of kernels/spectral_penalty.py). M1 = B_hᵀ D B_h, M2 = Bᵀ B, M3 = A Aᵀ,
M4 = A_h D A_hᵀ (r×r, D = diag(ω_l²)); full frame B_h = B, A_h = A; head frame B_h = U_hᵀ B, A_h = A V_h.

    value_l = c·(⟨M1, M3⟩ + ⟨M2, M4⟩)          total_l = c·⟨M2, M3⟩ = c·‖B_l A_l‖²_F

Backward (g_l = dL/dvalue_l; total is not differentiated):
    full:  dA = 2c·g·(M1 A + M2 A D)                dB = 2c·g·(D B M3 + B M4)
    head:  dA = 2c·g·(M1 A + M2 A_h D V_hᵀ)         dB = 2c·g·(U_h D B_h M3 + B M4)

Kernel. ``_batched_gram_kernel`` runs the grid (r tiles, r tiles, L): program (i, j, l) accumulates tile (i, j)
of layer l's four Grams in fp32 over the long dimension, and either reduces it to its share of value_l and
total_l (forward) or stores the Grams (backward). One launch per group of layers, whatever L. The head frame's
B_h and A_h (before) and the gradient assembly from the stored Grams (after) are batched GEMMs (cuBLAS, fp32):
a constant number of launches per group, not per layer.
"""
import torch
import triton
import triton.language as tl

from .launch import GRAM_BLOCK_L, GRAM_CONFIG, GRAM_MAX_BLOCK_R, launch, pow2_block
from .spectral_penalty import gram_acc, store_grams


@triton.jit
def _batched_gram_kernel(xb_ptr, s_xbn, s_xbr, s_xbl, xa_ptr, s_xan, s_xar, s_xal,
                         xbh_ptr, s_xbhn, s_xbhr, s_xbhl, xah_ptr, s_xahn, s_xahr, s_xahl,
                         w_ptr, s_wn, out_ptr, R, L_b, L_a, L_h, coeff,
                         STORE_GRAMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    # Per layer n, r × L views: Xb = Bᵀ (L_b), Xa = A (L_a), Xbh = B_hᵀ (L_h), Xah = A_h (L_h), w = ω² (L_h).
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_i = (pid_i * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_j = (pid_j * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_i = offs_i < R
    mask_j = offs_j < R
    w = w_ptr + n * s_wn
    zero = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    m1 = gram_acc(zero, xbh_ptr + n * s_xbhn, s_xbhr, s_xbhl, L_h, w, offs_i, offs_j, mask_i, mask_j, True, BLOCK_L)
    m4 = gram_acc(zero, xah_ptr + n * s_xahn, s_xahr, s_xahl, L_h, w, offs_i, offs_j, mask_i, mask_j, True, BLOCK_L)
    m2 = gram_acc(zero, xb_ptr + n * s_xbn, s_xbr, s_xbl, L_b, w, offs_i, offs_j, mask_i, mask_j, False, BLOCK_L)
    m3 = gram_acc(zero, xa_ptr + n * s_xan, s_xar, s_xal, L_a, w, offs_i, offs_j, mask_i, mask_j, False, BLOCK_L)
    if STORE_GRAMS:
        # out: (L, 4, R, R) fp32, contiguous; layer n's four Grams start at n · 4R².
        store_grams(out_ptr + n * 4 * R * R, R, m1, m2, m3, m4, offs_i, offs_j, mask_i, mask_j)
    else:
        # out: (L, 2, tiles) fp32; padding rows/columns are zero in every Gram, so the tile sums are exact.
        tiles = tl.num_programs(0) * tl.num_programs(1)
        tile = pid_i * tl.num_programs(1) + pid_j
        value = tl.sum(tl.sum(m1 * m3 + m2 * m4, axis=1), axis=0) * coeff
        total = tl.sum(tl.sum(m2 * m3, axis=1), axis=0) * coeff
        tl.store(out_ptr + n * 2 * tiles + tile, value)
        tl.store(out_ptr + n * 2 * tiles + tiles + tile, total)


def _check(A, B, U, V, omega2):
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(f"batched penalty: A must be (L, r, a) and B (L, b, r), got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if A.dtype != B.dtype:
        raise ValueError(f"batched penalty: A and B must share a dtype, got {A.dtype} and {B.dtype}")
    if (U is None) != (V is None):
        raise ValueError("batched penalty: U and V must both be given (head frame) or both be None (full frame)")
    L, r, a = A.shape
    b = B.shape[1]
    if U is None:
        h = a
        if a != b:
            raise ValueError(f"batched penalty, full frame: A (L, r, k) and B (L, k, r) need one k, got {a} and {b}")
    else:
        h = U.shape[-1]
        if tuple(U.shape) != (L, b, h) or tuple(V.shape) != (L, a, h):
            raise ValueError(f"batched penalty: U must be {(L, b, h)} and V {(L, a, h)}, got {tuple(U.shape)} and "
                             f"{tuple(V.shape)}")
    if tuple(omega2.shape) != (L, h) or omega2.stride(-1) != 1:
        raise ValueError(f"batched penalty: omega2 must be ({L}, {h}) with unit stride in its last dim, got "
                         f"{tuple(omega2.shape)}")
    return L, r, h


def _launch(A, B, B_h, A_h, omega2, out, r, h, coeff):
    """The Gram kernel over (tiles, tiles, L); B_h (L, h, r) and A_h (L, r, h) given (the full frame passes B, A)."""
    store = out.dim() == 4
    br = pow2_block(r, GRAM_MAX_BLOCK_R)
    nr = triton.cdiv(r, br)
    L = A.shape[0]
    args = (B, B.stride(0), B.stride(2), B.stride(1), A, A.stride(0), A.stride(1), A.stride(2),
            B_h, B_h.stride(0), B_h.stride(2), B_h.stride(1), A_h, A_h.stride(0), A_h.stride(1), A_h.stride(2),
            omega2, omega2.stride(0), out, r, B.shape[1], A.shape[2], h, float(coeff))
    launch(_batched_gram_kernel, lambda meta: (nr, nr, L), args,
           dict(STORE_GRAMS=store, BLOCK_R=br, BLOCK_L=GRAM_BLOCK_L), [GRAM_CONFIG], {}, (r, h),
           "batched penalty grams" if store else "batched penalty value")


def _head_factors(A, B, U, V):
    """B_h = U_hᵀ B (L, h, r) and A_h = A V_h (L, r, h) in fp32 (batched GEMMs)."""
    return U.float().mT @ B.float(), A.float() @ V.float()


def _batch_of_one(A, B, U, V, omega2):
    return A[None], B[None], None if U is None else U[None], None if V is None else V[None], omega2[None]


def spectral_penalty_batched_forward(A, B, U, V, omega2, coeff):
    """(value, total), each (L,) in A's dtype; A (L, r, a), B (L, b, r), U (L, b, h) and V (L, a, h) or both None
    (full frame), omega2 (L, h); any strides (omega2 unit stride in its last dim); one layer's unbatched inputs
    give 0-dim results. Arithmetic in fp32."""
    if A.dim() == 2:  # one layer, unbatched: 0-dim results
        value, total = spectral_penalty_batched_forward(*_batch_of_one(A, B, U, V, omega2), coeff)
        return value[0], total[0]
    L, r, h = _check(A, B, U, V, omega2)
    nr = triton.cdiv(r, pow2_block(r, GRAM_MAX_BLOCK_R))
    parts = torch.empty((L, 2, nr * nr), device=A.device, dtype=torch.float32)
    B_h, A_h = (B, A) if U is None else _head_factors(A, B, U, V)
    _launch(A, B, B_h, A_h, omega2, parts, r, h, coeff)
    sums = parts.sum(-1)
    return sums[:, 0].to(A.dtype), sums[:, 1].to(A.dtype)


def spectral_penalty_batched_backward(grad, A, B, U, V, omega2, coeff):
    """(dA, dB) of Σ_l grad_l·value_l, grad (L,); shapes as in the forward; contiguous, in A's dtype."""
    if A.dim() == 2:  # one layer, unbatched
        dA, dB = spectral_penalty_batched_backward(grad.reshape(1), *_batch_of_one(A, B, U, V, omega2), coeff)
        return dA[0], dB[0]
    L, r, h = _check(A, B, U, V, omega2)
    if tuple(grad.shape) != (L,):
        raise ValueError(f"batched penalty: grad must have shape ({L},), got {tuple(grad.shape)}")
    grams = torch.empty((L, 4, r, r), device=A.device, dtype=torch.float32)
    full = U is None
    B_h, A_h = (B, A) if full else _head_factors(A, B, U, V)
    _launch(A, B, B_h, A_h, omega2, grams, r, h, 0.0)
    M1, M2, M3, M4 = grams.unbind(1)
    A32, B32, w = A.float(), B.float(), omega2.float()
    factor = (2.0 * float(coeff)) * grad.float()[:, None, None]
    if full:
        dA = M1 @ A32 + (M2 @ A32) * w[:, None, :]
        dB = (B32 * w[:, :, None]) @ M3 + B32 @ M4
    else:
        B_h, A_h = B_h.float(), A_h.float()
        dA = M1 @ A32 + ((M2 @ A_h) * w[:, None, :]) @ V.float().mT
        dB = U.float() @ ((B_h * w[:, :, None]) @ M3) + B32 @ M4
    return (dA * factor).to(A.dtype).contiguous(), (dB * factor).to(B.dtype).contiguous()
