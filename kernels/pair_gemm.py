"""The pair kernel: two independent tall-skinny GEMMs in one launch — the GEMM engine of every rank-r product.

All products around a rank-r adapter are "tall-skinny": one long side (d_in, d_out, k or the token count T), one
side of width r. The spectral projection (P = V Aᵀ, Q = U B and their gradients), the adapter's down-projections
and reductions (S = x_a P, G = dy Q, dQ = s·dyᵀ S, dP = s·x_aᵀ G) and the penalty's gradient assembly all run
here. The grid covers the row blocks of both outputs; the fused adapter GEMM (kernels/tail_adapter.py) shares
:func:`accumulate_product`, the inner loop.

Generic form computed by ``_pair_kernel`` for each of its two problems (a and b):

    out[m, n] = alpha · g · ( rs1[m] · Σ_k X1[m, k] Y1[k, n]  +  rs2[m] · Σ_j X2[m, j] Y2[j, n] )

with arbitrary strides for every operand (transposes are free), optional row scales rs1/rs2 (both read from
one vector w), an optional device scalar g, fp32 accumulation, and a store in the output's dtype.

Split-K. The reductions over tokens (dQ = s·dyᵀ S and dP = s·x_aᵀ G in the adapter's backward) have few output
rows (d / BLOCK_M programs: 64 at d = 4096) and a long K (the token count). When the grid is smaller than the
SM count, the K range is cut into n_split chunks along a third grid axis (:func:`launch.split_count`); each
program stores its fp32 partial to a workspace (n_split, M, N) and the host sums the partials (a deterministic
reduction, no atomics).

Precision. The operands of ``tl.dot`` are cast to DOT_DTYPE: the inputs' 16-bit dtype (tensor cores), or
float32 with IEEE products (no TF32: the fp32 oracle tolerance is 2e-5 and TF32 rounds operands to 11 bits).
The Triton interpreter computes bf16/fp16 arithmetic wrongly, so under it DOT_DTYPE is always float32.
"""
import collections

import torch
import triton
import triton.language as tl

from .launch import (PAIR_CONFIGS, PAIR_FP32_CONFIG, PAIR_INTERPRET_CONFIG, PAIR_MAX_BLOCK_N, TL_DTYPES,
                     device_info, fitting, interpreting, launch, pow2_block, split_count)


@triton.jit
def accumulate_product(x_ptr, s_xm, s_xk, y_ptr, s_yk, s_yn, k_start, k_end, offs_m, offs_n, mask_m, mask_n,
                       DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # fp32 accumulator of the (BLOCK_M, BLOCK_N) tile of X Y over k in [k_start, k_end), BLOCK_K at a time.
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = x_ptr + offs_m[:, None] * s_xm + (k_start + offs_k)[None, :] * s_xk
    y_ptrs = y_ptr + (k_start + offs_k)[:, None] * s_yk + offs_n[None, :] * s_yn
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        y = tl.load(y_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, y, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * s_xk
        y_ptrs += BLOCK_K * s_yk
    return acc


@triton.jit
def _pair_tile(x1_ptr, s_x1m, s_x1k, y1_ptr, s_y1k, s_y1n, K1,
               x2_ptr, s_x2m, s_x2k, y2_ptr, s_y2k, s_y2n, K2,
               out_ptr, s_om, s_on, s_os, M, N, coef, w_ptr, pid_m, pid_n, pid_s, n_split,
               RS1: tl.constexpr, RS2: tl.constexpr, TWO_TERMS: tl.constexpr, DOT_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One (BLOCK_M, BLOCK_N) tile of coef · (rs1 ∘ X1 Y1 + rs2 ∘ X2 Y2) over split pid_s of the K ranges,
    # stored at out + pid_s · s_os (the workspace slice of that split; s_os is unused when n_split = 1).
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    chunk1 = tl.cdiv(tl.cdiv(K1, n_split), BLOCK_K) * BLOCK_K
    start1 = pid_s * chunk1
    acc1 = accumulate_product(x1_ptr, s_x1m, s_x1k, y1_ptr, s_y1k, s_y1n, start1, tl.minimum(K1, start1 + chunk1),
                              offs_m, offs_n, mask_m, mask_n, DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO_TERMS:
        chunk2 = tl.cdiv(tl.cdiv(K2, n_split), BLOCK_K) * BLOCK_K
        start2 = pid_s * chunk2
        acc2 = accumulate_product(x2_ptr, s_x2m, s_x2k, y2_ptr, s_y2k, s_y2n, start2,
                                  tl.minimum(K2, start2 + chunk2), offs_m, offs_n, mask_m, mask_n, DOT_DTYPE,
                                  BLOCK_M, BLOCK_N, BLOCK_K)

    if RS1 or RS2:
        w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        if RS1:
            acc1 = acc1 * w[:, None]
        if RS2:
            acc2 = acc2 * w[:, None]
    out = (acc1 + acc2) * coef
    out_ptrs = out_ptr + pid_s.to(tl.int64) * s_os + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _pair_kernel(
        # problem a: out_a (Ma, Na) = alpha_a · g · (rs1 ∘ X1a Y1a + rs2 ∘ X2a Y2a)
        xa1_ptr, s_xa1m, s_xa1k, ya1_ptr, s_ya1k, s_ya1n, Ka1,
        xa2_ptr, s_xa2m, s_xa2k, ya2_ptr, s_ya2k, s_ya2n, Ka2,
        oa_ptr, s_oam, s_oan, s_oas, Ma, Na, alpha_a,
        # problem b, same layout
        xb1_ptr, s_xb1m, s_xb1k, yb1_ptr, s_yb1k, s_yb1n, Kb1,
        xb2_ptr, s_xb2m, s_xb2k, yb2_ptr, s_yb2k, s_yb2n, Kb2,
        ob_ptr, s_obm, s_obn, s_obs, Mb, Nb, alpha_b,
        w_ptr, g_ptr,
        A_RS1: tl.constexpr, A_RS2: tl.constexpr, B_RS1: tl.constexpr, B_RS2: tl.constexpr,
        HAS_G: tl.constexpr, TWO_TERMS: tl.constexpr, DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: (cdiv(Ma, BLOCK_M) + cdiv(Mb, BLOCK_M), cdiv(max(Na, Nb), BLOCK_N), n_split). Programs below the
    # first boundary work on problem a, the rest on problem b; axis 2 is the split-K chunk.
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    g = 1.0
    if HAS_G:
        g = tl.load(g_ptr).to(tl.float32)
    num_a = tl.cdiv(Ma, BLOCK_M)
    if pid < num_a:
        _pair_tile(xa1_ptr, s_xa1m, s_xa1k, ya1_ptr, s_ya1k, s_ya1n, Ka1,
                   xa2_ptr, s_xa2m, s_xa2k, ya2_ptr, s_ya2k, s_ya2n, Ka2,
                   oa_ptr, s_oam, s_oan, s_oas, Ma, Na, alpha_a * g, w_ptr, pid, pid_n, pid_s, n_split,
                   A_RS1, A_RS2, TWO_TERMS, DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _pair_tile(xb1_ptr, s_xb1m, s_xb1k, yb1_ptr, s_yb1k, s_yb1n, Kb1,
                   xb2_ptr, s_xb2m, s_xb2k, yb2_ptr, s_yb2k, s_yb2n, Kb2,
                   ob_ptr, s_obm, s_obn, s_obs, Mb, Nb, alpha_b * g, w_ptr, pid - num_a, pid_n, pid_s, n_split,
                   B_RS1, B_RS2, TWO_TERMS, DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)


# One product term X (M, K) @ Y (K, N), both tensors with arbitrary strides.
Term = collections.namedtuple("Term", ["x", "y"])


def _problem_args(out, terms, alpha, split_stride):
    """Flatten one problem (output, up to two terms, alpha) into the kernel's positional arguments."""
    args = []
    for term in terms:
        if term is None or term.x.shape[1] == 0:
            # An empty term: K = 0, so no load happens; the output pointer stands in for the operands.
            args += [out, 0, 0, out, 0, 0, 0]
        else:
            x, y = term.x, term.y
            args += [x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), x.shape[1]]
    m, n = out.shape[-2:]
    args += [out, out.stride(-2), out.stride(-1), split_stride, m, n, float(alpha)]
    return args


def launch_pair(out_a, terms_a, alpha_a=1.0, out_b=None, terms_b=(), alpha_b=1.0,
                w=None, rs_a=(False, False), rs_b=(False, False), g=None, upcast=False,
                max_block_n=PAIR_MAX_BLOCK_N, dot_dtype=None, split_k=None, site="pair"):
    """Host helper for ``_pair_kernel``: computes problem a (and b if ``out_b`` is given) in one launch.

    ``terms_*`` are up to two ``Term``; ``out_*`` are preallocated 2-D outputs (any strides). Callers check
    shapes, dtypes and devices. ``upcast=True`` makes every operand fp32 before ``tl.dot`` and uses the
    fixed ``PAIR_FP32_CONFIG`` instead of autotuning; ``dot_dtype`` (default: the first operand's dtype) is the
    dtype the operands are rounded to otherwise. ``max_block_n`` caps the output tile width. ``split_k`` forces
    the number of split-K chunks (default: :func:`split_count` for the device). ``site`` names the call site
    in tuning keys and in ``taillor check-kernels``.
    """
    if out_b is None:
        out_b = out_a[:0]  # zero rows: problem b has no programs
    terms_a = list(terms_a) + [None] * (2 - len(terms_a))
    terms_b = list(terms_b) + [None] * (2 - len(terms_b))
    ma, na = out_a.shape
    mb, nb = out_b.shape
    if ma * na + mb * nb == 0:
        return
    bn = pow2_block(max(na, nb), min(max_block_n, PAIR_MAX_BLOCK_N))
    k_len = max((t.x.shape[1] for t in terms_a + terms_b if t is not None), default=0)
    if split_k is None:
        info = device_info(out_a.device)
        programs = (triton.cdiv(ma, 64) + triton.cdiv(mb, 64)) * triton.cdiv(max(na, nb), bn)
        split_k = split_count(programs, k_len, info.sm_count if info else None)
    targets_a, targets_b = out_a, out_b
    if split_k > 1:  # fp32 partial sums, one slice per chunk
        targets_a = torch.empty((split_k, ma, na), device=out_a.device, dtype=torch.float32)
        targets_b = torch.empty((split_k, mb, nb), device=out_b.device, dtype=torch.float32)
    dummy = out_a if out_a.numel() else out_b
    args = (_problem_args(targets_a, terms_a, alpha_a, targets_a.stride(0) if split_k > 1 else 0)
            + _problem_args(targets_b, terms_b, alpha_b, targets_b.stride(0) if split_k > 1 else 0)
            + [dummy if w is None else w, dummy if g is None else g])
    two_terms = any(t is not None and t.x.shape[1] > 0 for t in (terms_a[1], terms_b[1]))
    first = next((t.x for t in terms_a + terms_b if t is not None), out_a)
    if upcast or interpreting():
        dot = tl.float32
    else:
        dot = TL_DTYPES[dot_dtype or first.dtype]
    flags = dict(A_RS1=rs_a[0], A_RS2=rs_a[1], B_RS1=rs_b[0], B_RS2=rs_b[1], HAS_G=g is not None,
                 TWO_TERMS=two_terms, DOT_DTYPE=dot, BLOCK_N=bn)

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(ma, bm) + triton.cdiv(mb, bm), triton.cdiv(max(na, nb), meta["BLOCK_N"]), split_k)

    itemsize = max((t.element_size() for term in terms_a + terms_b if term is not None for t in term), default=4)
    configs = [PAIR_FP32_CONFIG] if upcast else fitting(PAIR_CONFIGS, out_a.device, itemsize, bn)
    launch(_pair_kernel, grid, args, flags, configs, PAIR_INTERPRET_CONFIG, (ma, mb, max(na, nb), k_len, split_k),
           site, (itemsize, bn))
    if split_k > 1:
        for out, partial in ((out_a, targets_a), (out_b, targets_b)):
            if out.numel():
                out.copy_(partial.sum(0))
