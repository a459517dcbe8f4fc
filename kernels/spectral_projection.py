"""Triton kernels: spectral projection between the SVD frame and the rank-r LoRA factors (full frame).

Math (DESIGN §1, full frame). With the frozen frame U (d_out, k), V (d_in, k) and the trainable spectral
factors A (r, k), B (k, r), the adapter runs as a plain rank-r LoRA with

    P = V Aᵀ   (d_in, r)        Q = U B   (d_out, r).

Backward: P and Q are linear in A and B, so for upstream gradients dP, dQ

    dL/dA[i, j] = Σ_a dP[a, i] V[a, j]          →  dA = dPᵀ V   (r, k)
    dL/dB       = Uᵀ dQ                         →  dB = Uᵀ dQ   (k, r).

U and V are frozen, so they get no gradient.

All four products are "tall-skinny": one long side (d_in, d_out or k), one side of width r. They run on
``_pair_kernel``, which computes two independent tall-skinny products in one launch; the grid covers the
row blocks of both outputs. The same kernel serves the adapter's down-projections and reductions
(kernels/tail_adapter.py) and the penalty gradients (kernels/spectral_penalty.py), which import the private
host helper ``_launch_pair`` from here.

Generic form computed by ``_pair_kernel`` for each of its two problems (a and b):

    out[m, n] = alpha · g · ( rs1[m] · Σ_k X1[m, k] Y1[k, n]  +  rs2[m] · Σ_j X2[m, j] Y2[j, n] )

with arbitrary strides for every operand (transposes are free), optional row scales rs1/rs2 (both read from
one vector w), an optional device scalar g, fp32 accumulation, and a store in the output's dtype.

Split-K. The reductions over tokens (dQ = s·dyᵀ S and dP = s·x_aᵀ G in the adapter's backward) have few output
rows (d / BLOCK_M programs: 64 at d = 4096) and a long K (the token count). When the grid is smaller than the
SM count, the K range is cut into n_split chunks along a third grid axis; each program stores its fp32 partial
to a workspace (n_split, M, N) and the host sums the partials (a deterministic reduction, no atomics).

Precision. The operands of ``tl.dot`` are cast to DOT_DTYPE: the inputs' 16-bit dtype (tensor cores), or
float32 with IEEE products (no TF32: the fp32 oracle tolerance is 2e-5 and TF32 rounds operands to 11 bits).
The Triton interpreter computes bf16/fp16 arithmetic wrongly, so under it DOT_DTYPE is always float32.
"""
import collections

import torch
import triton
import triton.language as tl

from .launch import (FLOAT_DTYPES, TL_DTYPES, check_2d, check_device, check_dtype, device_info, empty_output,
                     fitting, interpreting, launch, pow2_block)

MAX_BLOCK_N = 64  # widest output tile along the rank dimension; wider outputs get more programs
_SPLIT_MIN_CHUNK = 1024  # split-K only when every chunk keeps at least this many K elements
_MAX_SPLIT = 16


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


# GPU autotuning space. Each pipelined loop holds num_stages buffers of (BLOCK_M + BLOCK_N)·BLOCK_K elements.
# BLOCK_K 64/128 streams the long operand in wide chunks (these products are memory bound); configs that do not
# fit the device's shared memory are dropped at launch, and `taillor check-kernels` compiles every one of them
# for sm_80 and sm_90 at the specializations of the real call sites.
PAIR_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
]
# fp32-arithmetic call sites (penalty gradients, head factors: small problems) use one fixed config.
PAIR_FP32_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_PAIR_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 64}
# One product term X (M, K) @ Y (K, N), both tensors with arbitrary strides.
Term = collections.namedtuple("Term", ["x", "y"])


def split_count(programs: int, k_len: int, sm_count: int | None) -> int:
    """Split-K chunks for a grid of ``programs`` with a reduction of length ``k_len``: enough to fill the SMs,
    at most _MAX_SPLIT, and never chunks shorter than _SPLIT_MIN_CHUNK. 1 without a device (interpreter)."""
    if not sm_count or programs >= sm_count:
        return 1
    return max(1, min(sm_count // max(programs, 1), k_len // _SPLIT_MIN_CHUNK, _MAX_SPLIT))


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
                max_block_n=MAX_BLOCK_N, dot_dtype=None, split_k=None, site="pair"):
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
    bn = pow2_block(max(na, nb), min(max_block_n, MAX_BLOCK_N))
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
    launch(_pair_kernel, grid, args, flags, configs, _PAIR_INTERPRET_CONFIG, (ma, mb, max(na, nb), k_len, split_k),
           site, (itemsize, bn))
    if split_k > 1:
        for out, partial in ((out_a, targets_a), (out_b, targets_b)):
            if out.numel():
                out.copy_(partial.sum(0))


# ---------------------------------------------------------------------------------------------------------
# Launchers


def spectral_projection_forward(A, B, U, V, out_dtype=None):
    """P = V Aᵀ (d_in, r) and Q = U B (d_out, r), in one launch.

    Shapes: A (r, k), B (k, r), U (d_out, k), V (d_in, k); all one dtype (float32, float16 or bfloat16),
    any strides, one CUDA device (any device under TRITON_INTERPRET=1). P and Q come back contiguous in
    ``out_dtype`` (default: the inputs' dtype); accumulation is in fp32. With a 16-bit ``out_dtype`` (the
    activation dtype of a bf16/fp16 layer) the operands are rounded to it and multiplied on tensor cores: the
    products are rounded to that dtype on output anyway.
    """
    check_2d("U", U)
    k = U.shape[1]
    check_2d("V", V, cols=k)
    check_2d("A", A, cols=k)
    r = A.shape[0]
    check_2d("B", B, rows=k, cols=r)
    check_dtype("U", U)
    for name, t in (("V", V), ("A", A), ("B", B)):
        check_dtype(name, t, U.dtype)
    out_dtype = U.dtype if out_dtype is None else out_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    check_device(A=A, B=B, U=U, V=V)
    P = torch.empty((V.shape[0], r), device=U.device, dtype=out_dtype)
    Q = torch.empty((U.shape[0], r), device=U.device, dtype=out_dtype)
    dot = out_dtype if out_dtype.itemsize < U.dtype.itemsize else U.dtype
    launch_pair(P, [Term(V, A.t())], 1.0, Q, [Term(U, B)], 1.0, dot_dtype=dot, site="projection fwd")
    return P, Q


def spectral_projection_backward(dP, dQ, U, V):
    """dA = dPᵀ V (r, k) and dB = Uᵀ dQ (k, r), in one launch (see the module docstring for the derivation).

    Shapes: dP (d_in, r) or None, dQ (d_out, r) or None, U (d_out, k), V (d_in, k); U and V one dtype, dP and
    dQ that dtype or a 16-bit one (the gradient of a projection made with ``out_dtype``; then the products run
    on tensor cores in it). Any strides. A None upstream gradient gives an empty 1-D output (the op schema).
    dA and dB come back contiguous in U's dtype; accumulation is in fp32. dA is computed as its transpose
    Vᵀ dP (a tall-skinny product over d_in) and stored through transposed strides.
    """
    check_2d("U", U)
    k = U.shape[1]
    check_2d("V", V, cols=k)
    check_dtype("U", U)
    check_dtype("V", V, U.dtype)
    r = None
    grad_dtype = None
    if dP is not None:
        check_2d("dP", dP, rows=V.shape[0])
        check_dtype("dP", dP)
        r, grad_dtype = dP.shape[1], dP.dtype
    if dQ is not None:
        check_2d("dQ", dQ, rows=U.shape[0], cols=r)
        check_dtype("dQ", dQ, grad_dtype)
        grad_dtype = dQ.dtype
    check_device(dP=dP, dQ=dQ, U=U, V=V)
    dA = empty_output(U) if dP is None else torch.empty((dP.shape[1], k), device=U.device, dtype=U.dtype)
    dB = empty_output(U) if dQ is None else torch.empty((k, dQ.shape[1]), device=U.device, dtype=U.dtype)
    if dP is None and dQ is None:
        return dA, dB
    dot = grad_dtype if grad_dtype.itemsize < U.dtype.itemsize else U.dtype
    problems = []
    if dP is not None:
        problems += [dA.t(), [Term(V.t(), dP)], 1.0]
    if dQ is not None:
        problems += [dB, [Term(U.t(), dQ)], 1.0]
    launch_pair(*problems, dot_dtype=dot, site="projection bwd")
    return dA, dB
