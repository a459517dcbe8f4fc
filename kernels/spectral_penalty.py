"""Triton kernels: the TailLoR spectral penalty in Gram form (forward value and gradients).

Math. D = diag(ω²) with ω² = ``omega2`` given, c = ``coeff`` (already λ·s²).

Full frame, A (r, k), B (k, r), ΔW = s·U B A Vᵀ with U, V orthonormal, so the penalty
λ(‖diag(ω) Uᵀ ΔW‖² + ‖ΔW V diag(ω)‖²) = c(‖diag(ω) B A‖² + ‖B A diag(ω)‖²) and, as r×r Gram matrices,

    value = c · ( ⟨Bᵀ D B, A Aᵀ⟩ + ⟨Bᵀ B, A D Aᵀ⟩ )                       (⟨X, Y⟩ = Σ X∘Y)

Head frame, A (r, d_in), B (d_out, r), U_h (d_out, h), V_h (d_in, h): with B_h = U_hᵀ B (h, r) and
A_h = A V_h (r, h), value = c · ( ⟨B_hᵀ D B_h, A Aᵀ⟩ + ⟨Bᵀ B, A_h D A_hᵀ⟩ ).

Backward (g = dL/dvalue). Write M1 = B_hᵀ D B_h, M2 = Bᵀ B, M3 = A Aᵀ, M4 = A_h D A_hᵀ (in full mode
B_h = B, A_h = A, V_h = U_h = I). All four are symmetric, and for symmetric M, N:
d⟨M, X Xᵀ⟩/dX = 2 M X and d⟨N, Xᵀ Y X⟩/dX = 2 Y X N (Y symmetric). Hence

    term 1 = ⟨M1, A Aᵀ⟩ = ‖D^½ B_h A‖²:  d/dA = 2 M1 A,             d/dB_h = 2 D B_h M3 → d/dB = 2 U_h D B_h M3
    term 2 = ⟨Bᵀ B, M4⟩ = ‖B A_h D^½‖²:  d/dB = 2 B M4,             d/dA_h = 2 M2 A_h D → d/dA = 2 M2 A_h D V_hᵀ

    full:  dA = 2c·g·(Bᵀ D B · A + Bᵀ B · A D)          dB = 2c·g·(D B · A Aᵀ + B · A D Aᵀ)
    head:  dA = 2c·g·(M1 A + M2 A_h D V_hᵀ)             dB = 2c·g·(U_h D B_h M3 + B M4)

Kernels. ``_penalty_gram_kernel`` accumulates the Gram tiles (fp32) of M1..M4, over programs (i, j) that
tile the r×r matrices; in full mode one pass over k reads each chunk of A and B once and feeds all four.
It either reduces the tile to its share of the value, c·(⟨M1, M3⟩ + ⟨M2, M4⟩)_ij (forward), or stores
the four Grams (backward). Products with U_h / V_h and the gradient assembly run on the pair kernel of
kernels/pair_gemm.py (two tall-skinny GEMMs per launch, optional row scale by ω²). Gradients
are computed as dAᵀ (a tall-skinny product) and stored through transposed strides. Launch counts:
full forward 1 (+1 sum when r > 32), full backward 2; head forward 2 (+1 sum when r > 32), head backward 4.
All arithmetic in fp32 (these are O(k·r²) problems; precision matters more than tensor cores here).
"""
import torch
import triton
import triton.language as tl

from .checks import check_penalty_grad, check_penalty_inputs
from .launch import GRAM_BLOCK_L, GRAM_CONFIG, GRAM_MAX_BLOCK_R, launch, pow2_block
from .pair_gemm import Term, launch_pair


@triton.jit
def gram_acc(acc, x_ptr, s_xr, s_xl, L, w_ptr, offs_i, offs_j, mask_i, mask_j,
              WEIGHTED: tl.constexpr, BLOCK_L: tl.constexpr):
    # acc (BR, BR) += Σ_l X[i, l] · w[l] · X[j, l] over one length-L loop (X given as r × L by strides).
    offs_l = tl.arange(0, BLOCK_L).to(tl.int64)
    for l0 in range(0, L, BLOCK_L):
        ol = l0 + offs_l
        mask_l = ol < L
        xi = tl.load(x_ptr + offs_i[:, None] * s_xr + ol[None, :] * s_xl,
                     mask=mask_i[:, None] & mask_l[None, :], other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + ol[:, None] * s_xl + offs_j[None, :] * s_xr,
                     mask=mask_l[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(w_ptr + ol, mask=mask_l, other=0.0).to(tl.float32)
            xi = xi * w[None, :]
        acc = tl.dot(xi, xj, acc, input_precision="ieee")
    return acc


@triton.jit
def store_grams(out_ptr, R, m1, m2, m3, m4, offs_i, offs_j, mask_i, mask_j):
    # One (BR, BR) tile of each of the four (R, R) fp32 Grams, stored as a contiguous (4, R, R) block at out_ptr.
    ptrs = out_ptr + offs_i[:, None] * R + offs_j[None, :]
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(ptrs, m1, mask=mask)
    tl.store(ptrs + R * R, m2, mask=mask)
    tl.store(ptrs + 2 * R * R, m3, mask=mask)
    tl.store(ptrs + 3 * R * R, m4, mask=mask)


@triton.jit
def _penalty_gram_kernel(xb_ptr, s_xbr, s_xbl, xa_ptr, s_xar, s_xal,
                         xbh_ptr, s_xbhr, s_xbhl, xah_ptr, s_xahr, s_xahl,
                         w_ptr, out_ptr, R, L_b, L_a, L_h, coeff,
                         FULL: tl.constexpr, STORE_GRAMS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    # Factors are r × L views: Xb = Bᵀ (L_b), Xa = A (L_a), Xbh = B_hᵀ (L_h), Xah = A_h (L_h).
    #   M1 = Xbh D Xbhᵀ,  M2 = Xb Xbᵀ,  M3 = Xa Xaᵀ,  M4 = Xah D Xahᵀ.
    # FULL: Xbh = Xb, Xah = Xa, one pass over L_b = L_a = k.
    # Program (i, j) owns the (BLOCK_R, BLOCK_R) tile (i, j) of the four Grams.
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = (pid_i * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_j = (pid_j * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_i = offs_i < R
    mask_j = offs_j < R
    m1 = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    m3 = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    m4 = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    if FULL:
        offs_l = tl.arange(0, BLOCK_L).to(tl.int64)
        for l0 in range(0, L_b, BLOCK_L):
            ol = l0 + offs_l
            mask_l = ol < L_b
            w = tl.load(w_ptr + ol, mask=mask_l, other=0.0).to(tl.float32)
            bi = tl.load(xb_ptr + offs_i[:, None] * s_xbr + ol[None, :] * s_xbl,
                         mask=mask_i[:, None] & mask_l[None, :], other=0.0).to(tl.float32)
            bj = tl.load(xb_ptr + ol[:, None] * s_xbl + offs_j[None, :] * s_xbr,
                         mask=mask_l[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            ai = tl.load(xa_ptr + offs_i[:, None] * s_xar + ol[None, :] * s_xal,
                         mask=mask_i[:, None] & mask_l[None, :], other=0.0).to(tl.float32)
            aj = tl.load(xa_ptr + ol[:, None] * s_xal + offs_j[None, :] * s_xar,
                         mask=mask_l[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            m2 = tl.dot(bi, bj, m2, input_precision="ieee")
            m1 = tl.dot(bi * w[None, :], bj, m1, input_precision="ieee")
            m3 = tl.dot(ai, aj, m3, input_precision="ieee")
            m4 = tl.dot(ai * w[None, :], aj, m4, input_precision="ieee")
    else:
        m1 = gram_acc(m1, xbh_ptr, s_xbhr, s_xbhl, L_h, w_ptr, offs_i, offs_j, mask_i, mask_j, True, BLOCK_L)
        m4 = gram_acc(m4, xah_ptr, s_xahr, s_xahl, L_h, w_ptr, offs_i, offs_j, mask_i, mask_j, True, BLOCK_L)
        m2 = gram_acc(m2, xb_ptr, s_xbr, s_xbl, L_b, w_ptr, offs_i, offs_j, mask_i, mask_j, False, BLOCK_L)
        m3 = gram_acc(m3, xa_ptr, s_xar, s_xal, L_a, w_ptr, offs_i, offs_j, mask_i, mask_j, False, BLOCK_L)
    if STORE_GRAMS:
        store_grams(out_ptr, R, m1, m2, m3, m4, offs_i, offs_j, mask_i, mask_j)
    else:
        # Padding rows/columns are zero in every Gram, so the tile sum is exact.
        part = tl.sum(tl.sum(m1 * m3 + m2 * m4, axis=1), axis=0) * coeff
        tl.store(out_ptr + pid_i * tl.num_programs(1) + pid_j, part)


def _head_factors(A, B, U, V, r, h):
    """A_hᵀ = V_hᵀ Aᵀ (h, r) and B_h = U_hᵀ B (h, r), fp32, one launch."""
    A_hT = torch.empty((h, r), device=A.device, dtype=torch.float32)
    B_h = torch.empty((h, r), device=A.device, dtype=torch.float32)
    launch_pair(A_hT, [Term(V.t(), A.t())], 1.0, B_h, [Term(U.t(), B)], 1.0, upcast=True,
                max_block_n=GRAM_MAX_BLOCK_R, site="penalty head factors")
    return A_hT, B_h


def _grams(A, B, A_hT, B_h, omega2, r, k_or_h, full, out, coeff=0.0):
    store = out.dim() == 3
    br = pow2_block(r, GRAM_MAX_BLOCK_R)
    nr = triton.cdiv(r, br)
    if full:
        A_hT, B_h = A.t(), B
    args = (B, B.stride(1), B.stride(0), A, A.stride(0), A.stride(1),
            B_h, B_h.stride(1), B_h.stride(0), A_hT, A_hT.stride(1), A_hT.stride(0),
            omega2, out, r, B.shape[0], A.shape[1], k_or_h, float(coeff))
    flags = dict(FULL=full, STORE_GRAMS=store, BLOCK_R=br, BLOCK_L=GRAM_BLOCK_L)
    launch(_penalty_gram_kernel, lambda meta: (nr, nr), args, flags, [GRAM_CONFIG], {}, (r, k_or_h),
           "penalty grams" if store else "penalty value")


def spectral_penalty_forward(A, B, U, V, omega2, coeff):
    """The spectral penalty value (0-dim fp32 tensor), in Gram form (see the module docstring).

    Full mode (U = V = None): A (r, k), B (k, r), omega2 (k,). Head mode: A (r, d_in), B (d_out, r),
    U (d_out, h), V (d_in, h), omega2 (h,). A and B share one dtype (float32, float16, bfloat16), U and V one
    too (a frame stored narrower is read in A's dtype, as a temporary: autograd keeps the stored one), any
    strides; omega2 any float dtype; coeff a float (λ·s²). All arithmetic in fp32; the 0-dim result comes back
    in A's dtype (the op schema).
    """
    full, r, kh = check_penalty_inputs(A, B, U, V, omega2)
    nr = triton.cdiv(r, pow2_block(r, GRAM_MAX_BLOCK_R))
    parts = torch.empty((nr * nr,), device=A.device, dtype=torch.float32)
    A_hT = B_h = None
    if not full:
        A_hT, B_h = _head_factors(A, B, U.to(A.dtype), V.to(A.dtype), r, kh)
    _grams(A, B, A_hT, B_h, omega2, r, kh, full, parts, coeff)
    return (parts[0] if nr == 1 else parts.sum()).to(A.dtype)


def spectral_penalty_backward(grad, A, B, U, V, omega2, coeff):
    """Gradients (dA, dB) of the spectral penalty scaled by ``grad`` (a 0-dim tensor, read on the device).

    Shapes as in ``spectral_penalty_forward``; dA and dB come back contiguous in A's dtype.
    full: dA = 2c·g·(Bᵀ D B A + Bᵀ B A D), dB = 2c·g·(D B A Aᵀ + B A D Aᵀ);
    head: dA = 2c·g·(M1 A + M2 A_h D V_hᵀ), dB = 2c·g·(U_h D B_h M3 + B M4) (derivation in the module
    docstring).
    """
    full, r, kh = check_penalty_inputs(A, B, U, V, omega2)
    check_penalty_grad(grad, A)
    g = grad.reshape(1)
    dev = A.device
    grams = torch.empty((4, r, r), device=dev, dtype=torch.float32)
    dA = torch.empty(A.shape, device=dev, dtype=A.dtype)
    dB = torch.empty(B.shape, device=dev, dtype=B.dtype)
    two_c = 2.0 * float(coeff)
    if full:
        _grams(A, B, None, None, omega2, r, kh, True, grams)
        M1, M2, M3, M4 = grams.unbind(0)
        # dAᵀ (k, r) = 2cg·(Aᵀ M1ᵀ + D Aᵀ M2ᵀ)     dB (k, r) = 2cg·(D B M3 + B M4)
        launch_pair(dA.t(), [Term(A.t(), M1.t()), Term(A.t(), M2.t())], two_c,
                    dB, [Term(B, M3), Term(B, M4)], two_c,
                    w=omega2, rs_a=(False, True), rs_b=(True, False), g=g, upcast=True,
                    max_block_n=GRAM_MAX_BLOCK_R, site="penalty full dA, dB")
        return dA, dB
    U, V = U.to(A.dtype), V.to(A.dtype)
    A_hT, B_h = _head_factors(A, B, U, V, r, kh)
    _grams(A, B, A_hT, B_h, omega2, r, kh, False, grams)
    M1, M2, M3, M4 = grams.unbind(0)
    # N_Aᵀ = D A_hᵀ M2 (h, r) and N_B = D B_h M3 (h, r), one launch.
    N_AT = torch.empty((kh, r), device=dev, dtype=torch.float32)
    N_B = torch.empty((kh, r), device=dev, dtype=torch.float32)
    launch_pair(N_AT, [Term(A_hT, M2.t())], 1.0, N_B, [Term(B_h, M3)], 1.0,
                w=omega2, rs_a=(True, False), rs_b=(True, False), upcast=True,
                max_block_n=GRAM_MAX_BLOCK_R, site="penalty head N_A, N_B")
    # dAᵀ (d_in, r) = 2cg·(Aᵀ M1 + V_h N_Aᵀ)      dB (d_out, r) = 2cg·(U_h N_B + B M4)
    launch_pair(dA.t(), [Term(A.t(), M1.t()), Term(V, N_AT)], two_c,
                dB, [Term(U, N_B), Term(B, M4)], two_c, g=g, upcast=True, max_block_n=GRAM_MAX_BLOCK_R,
                site="penalty head dA, dB")
    return dA, dB
