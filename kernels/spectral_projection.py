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
"""
import collections
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_N = 64  # widest output tile along the rank dimension; wider outputs get more programs


@triton.jit
def _accumulate_product(x_ptr, s_xm, s_xk, y_ptr, s_yk, s_yn, K, offs_m, offs_n, mask_m, mask_n,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # fp32 accumulator of the (BLOCK_M, BLOCK_N) tile of X Y over K, in BLOCK_K chunks (masked edges).
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk
    y_ptrs = y_ptr + offs_k[:, None] * s_yk + offs_n[None, :] * s_yn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        else:
            y = y.to(x.dtype)
        acc = tl.dot(x, y, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * s_xk
        y_ptrs += BLOCK_K * s_yk
    return acc


@triton.jit
def _pair_tile(x1_ptr, s_x1m, s_x1k, y1_ptr, s_y1k, s_y1n, K1,
               x2_ptr, s_x2m, s_x2k, y2_ptr, s_y2k, s_y2n, K2,
               out_ptr, s_om, s_on, M, N, coef, w_ptr, pid_m, pid_n,
               RS1: tl.constexpr, RS2: tl.constexpr, TWO_TERMS: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One (BLOCK_M, BLOCK_N) output tile of coef · (rs1 ∘ X1 Y1 + rs2 ∘ X2 Y2).
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc1 = _accumulate_product(x1_ptr, s_x1m, s_x1k, y1_ptr, s_y1k, s_y1n, K1, offs_m, offs_n, mask_m, mask_n,
                               UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TWO_TERMS:
        acc2 = _accumulate_product(x2_ptr, s_x2m, s_x2k, y2_ptr, s_y2k, s_y2n, K2, offs_m, offs_n, mask_m, mask_n,
                                   UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)

    if RS1 or RS2:
        w = tl.load(w_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        if RS1:
            acc1 = acc1 * w[:, None]
        if RS2:
            acc2 = acc2 * w[:, None]
    out = (acc1 + acc2) * coef
    out_ptrs = out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _pair_kernel(
        # problem a: out_a (Ma, Na) = alpha_a · g · (rs1 ∘ X1a Y1a + rs2 ∘ X2a Y2a)
        xa1_ptr, s_xa1m, s_xa1k, ya1_ptr, s_ya1k, s_ya1n, Ka1,
        xa2_ptr, s_xa2m, s_xa2k, ya2_ptr, s_ya2k, s_ya2n, Ka2,
        oa_ptr, s_oam, s_oan, Ma, Na, alpha_a,
        # problem b, same layout
        xb1_ptr, s_xb1m, s_xb1k, yb1_ptr, s_yb1k, s_yb1n, Kb1,
        xb2_ptr, s_xb2m, s_xb2k, yb2_ptr, s_yb2k, s_yb2n, Kb2,
        ob_ptr, s_obm, s_obn, Mb, Nb, alpha_b,
        w_ptr, g_ptr,
        A_RS1: tl.constexpr, A_RS2: tl.constexpr, B_RS1: tl.constexpr, B_RS2: tl.constexpr,
        HAS_G: tl.constexpr, TWO_TERMS: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: (cdiv(Ma, BLOCK_M) + cdiv(Mb, BLOCK_M), cdiv(max(Na, Nb), BLOCK_N)). Programs below the
    # first boundary work on problem a, the rest on problem b.
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = 1.0
    if HAS_G:
        g = tl.load(g_ptr).to(tl.float32)
    num_a = tl.cdiv(Ma, BLOCK_M)
    if pid < num_a:
        _pair_tile(xa1_ptr, s_xa1m, s_xa1k, ya1_ptr, s_ya1k, s_ya1n, Ka1,
                   xa2_ptr, s_xa2m, s_xa2k, ya2_ptr, s_ya2k, s_ya2n, Ka2,
                   oa_ptr, s_oam, s_oan, Ma, Na, alpha_a * g, w_ptr, pid, pid_n,
                   A_RS1, A_RS2, TWO_TERMS, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _pair_tile(xb1_ptr, s_xb1m, s_xb1k, yb1_ptr, s_yb1k, s_yb1n, Kb1,
                   xb2_ptr, s_xb2m, s_xb2k, yb2_ptr, s_yb2k, s_yb2n, Kb2,
                   ob_ptr, s_obm, s_obn, Mb, Nb, alpha_b * g, w_ptr, pid - num_a, pid_n,
                   B_RS1, B_RS2, TWO_TERMS, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)


# GPU autotuning space. Each pipelined loop (one per problem branch; they are not overlapped) holds
# (num_stages - 1) buffers of (BLOCK_M + BLOCK_N)·BLOCK_K elements: with fp32 inputs and BLOCK_N = 64 the
# largest config takes 2·2·(128 + 64)·32·4 B = 96 KiB, which fits sm_80/sm_90 and also sm_86/sm_89 (99 KiB).
# `taillor check-kernels` compiles the largest config and checks it.
_PAIR_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
]
# fp32-arithmetic call sites (penalty gradients, head factors: small problems) use one fixed config.
_PAIR_FP32_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)
_PAIR_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 64}
_PAIR_AUTOTUNE_KEY = ["Ma", "Na", "Ka1", "Ka2", "Mb", "Nb", "Kb1", "Kb2"]
_pair_kernel_tuned = (None if _INTERPRET else
                      triton.autotune(configs=_PAIR_CONFIGS, key=_PAIR_AUTOTUNE_KEY)(_pair_kernel))


def _block_n(n):
    return min(_MAX_BLOCK_N, max(16, triton.next_power_of_2(max(int(n), 1))))


# One product term X (M, K) @ Y (K, N), both tensors with arbitrary strides.
_Term = collections.namedtuple("_Term", ["x", "y"])


def _problem_args(out, terms, alpha):
    """Flatten one problem (output, up to two terms, alpha) into the kernel's positional arguments."""
    args = []
    for term in terms:
        if term is None or term.x.shape[1] == 0:
            # An empty term: K = 0, so no load happens; the output pointer stands in for the operands.
            args += [out, 0, 0, out, 0, 0, 0]
        else:
            x, y = term.x, term.y
            args += [x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), x.shape[1]]
    m, n = out.shape
    args += [out, out.stride(0), out.stride(1), m, n, float(alpha)]
    return args


def _launch_pair(out_a, terms_a, alpha_a=1.0, out_b=None, terms_b=(), alpha_b=1.0,
                 w=None, rs_a=(False, False), rs_b=(False, False), g=None, upcast=False,
                 max_block_n=_MAX_BLOCK_N):
    """Host helper for ``_pair_kernel``: computes problem a (and b if ``out_b`` is given) in one launch.

    ``terms_*`` are up to two ``_Term``; ``out_*`` are preallocated 2-D outputs (any strides). Callers check
    shapes, dtypes and devices. ``upcast=True`` makes every operand fp32 before ``tl.dot`` and uses the
    fixed ``_PAIR_FP32_CONFIG`` instead of autotuning; under the interpreter (whose bf16/fp16 arithmetic
    is wrong) operands are always upcast.
    ``max_block_n`` caps the output tile width (outputs wider than it get more programs).
    """
    if out_b is None:
        out_b = out_a[:0]  # zero rows: problem b has no programs
    terms_a = list(terms_a) + [None] * (2 - len(terms_a))
    terms_b = list(terms_b) + [None] * (2 - len(terms_b))
    ma, na = out_a.shape
    mb, nb = out_b.shape
    if ma * na + mb * nb == 0:
        return
    dummy = out_a if out_a.numel() else out_b
    args = (_problem_args(out_a, terms_a, alpha_a) + _problem_args(out_b, terms_b, alpha_b)
            + [dummy if w is None else w, dummy if g is None else g])
    two_terms = any(t is not None and t.x.shape[1] > 0 for t in (terms_a[1], terms_b[1]))
    flags = dict(A_RS1=rs_a[0], A_RS2=rs_a[1], B_RS1=rs_b[0], B_RS2=rs_b[1], HAS_G=g is not None,
                 TWO_TERMS=two_terms,
                 UPCAST=bool(upcast) or _INTERPRET,
                 BLOCK_N=min(max_block_n, _block_n(max(na, nb))))

    def grid(meta):
        bm = meta["BLOCK_M"]
        return (triton.cdiv(ma, bm) + triton.cdiv(mb, bm), triton.cdiv(max(na, nb), meta["BLOCK_N"]))

    if _INTERPRET:
        _pair_kernel[grid](*args, **flags, **_PAIR_INTERPRET_CONFIG)
    elif upcast:
        cfg = _PAIR_FP32_CONFIG
        _pair_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _pair_kernel_tuned[grid](*args, **flags)


# ---------------------------------------------------------------------------------------------------------
# Launcher checks (shared with the other kernel files)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_device(**tensors):
    """All tensors on one device: CUDA, or any device under TRITON_INTERPRET=1 (how CI runs the kernels)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all inputs must share a device")
    if first.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{first_name} is on {first}: Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 to run them on the CPU)")


def _check_2d(name, t, rows=None, cols=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = (rows if rows is not None else "*", cols if cols is not None else "*")
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({want[0]}, {want[1]})")


def _check_dtype(name, t, dtype=None):
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but must match {dtype}")


# ---------------------------------------------------------------------------------------------------------
# Launchers


def spectral_projection_forward(A, B, U, V):
    """P = V Aᵀ (d_in, r) and Q = U B (d_out, r), in one launch.

    Shapes: A (r, k), B (k, r), U (d_out, k), V (d_in, k); all one dtype (float32, float16 or bfloat16),
    any strides, one CUDA device (any device under TRITON_INTERPRET=1). P and Q come back contiguous in that
    dtype; accumulation is in fp32.
    """
    _check_2d("U", U)
    k = U.shape[1]
    _check_2d("V", V, cols=k)
    _check_2d("A", A, cols=k)
    r = A.shape[0]
    _check_2d("B", B, rows=k, cols=r)
    _check_dtype("U", U)
    for name, t in (("V", V), ("A", A), ("B", B)):
        _check_dtype(name, t, U.dtype)
    _check_device(A=A, B=B, U=U, V=V)
    P = torch.empty((V.shape[0], r), device=U.device, dtype=U.dtype)
    Q = torch.empty((U.shape[0], r), device=U.device, dtype=U.dtype)
    _launch_pair(P, [_Term(V, A.t())], 1.0, Q, [_Term(U, B)], 1.0)
    return P, Q


def spectral_projection_backward(dP, dQ, U, V):
    """dA = dPᵀ V (r, k) and dB = Uᵀ dQ (k, r), in one launch (see the module docstring for the derivation).

    Shapes: dP (d_in, r) or None, dQ (d_out, r) or None, U (d_out, k), V (d_in, k); all one dtype, any
    strides. A None upstream gradient gives a None output. dA and dB come back contiguous in that dtype;
    accumulation is in fp32. dA is computed as its transpose Vᵀ dP (a tall-skinny product over d_in) and
    stored through transposed strides.
    """
    _check_2d("U", U)
    k = U.shape[1]
    _check_2d("V", V, cols=k)
    _check_dtype("U", U)
    _check_dtype("V", V, U.dtype)
    r = None
    if dP is not None:
        _check_2d("dP", dP, rows=V.shape[0])
        _check_dtype("dP", dP, U.dtype)
        r = dP.shape[1]
    if dQ is not None:
        _check_2d("dQ", dQ, rows=U.shape[0], cols=r)
        _check_dtype("dQ", dQ, U.dtype)
    _check_device(dP=dP, dQ=dQ, U=U, V=V)
    dA = None if dP is None else torch.empty((dP.shape[1], k), device=U.device, dtype=U.dtype)
    dB = None if dQ is None else torch.empty((k, dQ.shape[1]), device=U.device, dtype=U.dtype)
    if dA is not None and dB is not None:
        _launch_pair(dA.t(), [_Term(V.t(), dP)], 1.0, dB, [_Term(U.t(), dQ)], 1.0)
    elif dA is not None:
        _launch_pair(dA.t(), [_Term(V.t(), dP)], 1.0)
    elif dB is not None:
        _launch_pair(dB, [_Term(U.t(), dQ)], 1.0)
    return dA, dB
