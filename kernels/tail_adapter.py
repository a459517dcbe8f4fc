"""Triton kernels: the TailLoR adapter as a fused rank-r LoRA linear layer (forward and backward).

Math. x (T, d_in), frozen W (d_out, d_in), bias b (d_out,) or none, P (d_in, r), Q (d_out, r),
scale s. The adapter branch reads x_a = x, or x_adapter (e.g. dropout(x)) when given:

    S = x_a P                               (T, r)      saved for backward
    y = x Wᵀ + b + s · S Qᵀ                 (T, d_out)

Backward. With dy = dL/dy and G = dy Q (T, r):

    dL/dQ = s · dyᵀ S                       since y depends on Q through s·S Qᵀ: ∂y[t,o]/∂Q[o,j] = s·S[t,j]
    dL/dS = s · dy Q = s · G                hence, with S = x_a P,
    dL/dP = x_aᵀ (dL/dS) = s · x_aᵀ G
    dL/dx_a = (dL/dS) Pᵀ = s · G Pᵀ
    dL/dx  = dy W  (+ s · G Pᵀ when x_a is x itself, the two paths add).

Kernels and fusion:
- ``_tail_gemm_kernel`` computes out = A Bᵀ + s · C Dᵀ + bias, the low-rank product entering as one extra
  K-chunk of width r after the main K loop (into the same fp32 accumulator). Forward: A = x, B = W,
  C = S, D = Q. Backward: A = dy, Bᵀ = W (strides swapped), C = G, D = P gives dx with the adapter path
  fused; with K = 0 it gives dx_adapter = s · G Pᵀ alone. The alternative (base GEMM, then an in-place
  rank-r update of y) costs one more read and write of y; with no GPU to measure on we implement the
  extra-K-chunk form, which needs no second pass over y.
- The tall-skinny products run on the pair kernel of kernels/pair_gemm.py: S = x_a P (one read
  of x_a); G = dy Q and dQ = s · dyᵀ S in one launch (two program groups; dy is read once by each);
  dP = s · x_aᵀ G. A single read of dy for both G and dQ would need a cross-program reduction of dQ over
  T blocks: float atomics (nondeterministic gradients) or a partial-sum workspace of
  (T / BLOCK_M)·d_out·r floats. We keep the deterministic form; dy is read ~d_in/BLOCK_N times by the dx
  GEMM anyway, so the second read adds a few percent of the backward's dy traffic.

Precision: fp32 accumulation everywhere. G is kept in fp32 (T·r floats). On the GPU, fp16/bf16 operands
go to tl.dot in their own dtype (tensor cores; s·S and s·G are rounded to that dtype before the extra
K-chunk, as eager PyTorch rounds S and G) and fp32 operands use IEEE fp32 dots (no TF32), matching
PyTorch's default. Under TRITON_INTERPRET=1 every operand is upcast to fp32 before arithmetic.

The split route (kernels/tail_adapter_split.py) computes the same outputs with cuBLAS for the base products; the
onepass route (kernels/tail_adapter_onepass.py) runs this forward, and in its backward reads dy once for G and dQ
and folds dP into this GEMM (``HAS_FOLD``: each program also reads its tile of x_a and writes that row block's
partial of x_aᵀ G, so x_a gets no pass of its own).
"""
import torch
import triton
import triton.language as tl

from .checks import check_adapter_backward_inputs, check_adapter_inputs
from .launch import (FOLD_BLOCK_M, GEMM_INTERPRET_CONFIG, GEMM_MAX_BLOCK_R, TL_DTYPES, empty_output, fitting,
                     gemm_configs, interpreting, launch, pow2_block)
from .pair_gemm import Term, accumulate_product, launch_pair


@triton.jit
def _tail_gemm_kernel(a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, out_ptr, e_ptr, ws_ptr,
                      M, N, K, R,
                      s_am, s_ak, s_bn, s_bk, s_cm, s_cr, s_dn, s_dr, s_om, s_on, s_em, s_en, s_wb, s_wn,
                      scale,
                      HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_FOLD: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    # out (M, N) = A (M, K) · Bᵀ (K, N) + scale · C (M, R) · Dᵀ (R, N) + bias (N), fp32 accumulation.
    # HAS_FOLD (needs HAS_LOWRANK): also ws[pid_m, n, r] = Σ_{m in this row block} E[m, n] · C[m, r], the
    # row block's partial of Eᵀ C (N, R); E (M, N) is read once over the whole grid (see the onepass route).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks share each column block of B while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = accumulate_product(a_ptr, s_am, s_ak, b_ptr, s_bk, s_bn, 0, K, offs_m, offs_n, mask_m, mask_n,
                             DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_LOWRANK:
        # The extra K-chunk: scale · C Dᵀ, rank padded to BLOCK_R (masked), scale folded into C in fp32.
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        # Usually one iteration (r <= BLOCK_R); not pipelined, so it adds no shared-memory stages.
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            mask_r = (r0 + offs_r) < R
            c = tl.load(c_ptr + offs_m[:, None] * s_cm + (r0 + offs_r)[None, :] * s_cr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            d = tl.load(d_ptr + (r0 + offs_r)[:, None] * s_dr + offs_n[None, :] * s_dn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if HAS_FOLD:
                e = tl.load(e_ptr + offs_m[:, None] * s_em + offs_n[None, :] * s_en,
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
                part = tl.dot(tl.trans(e), c.to(DOT_DTYPE), input_precision="ieee")
                tl.store(ws_ptr + pid_m.to(tl.int64) * s_wb + offs_n[:, None] * s_wn + (r0 + offs_r)[None, :],
                         part, mask=mask_n[:, None] & mask_r[None, :])
            c = (c.to(tl.float32) * scale).to(DOT_DTYPE)
            acc = tl.dot(c, d.to(DOT_DTYPE), acc, input_precision="ieee")

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def launch_gemm(out, a, b_t, c, d, bias, scale, site, fold=None):
    """out = a @ b_t + scale · c @ dᵀ + bias. ``b_t`` is the (K, N) right operand as a strided view;
    c (M, R) and d (N, R) may be None (no low-rank chunk). ``fold`` = (e (M, N), ws (cdiv(M, FOLD_BLOCK_M), N, R)
    fp32) also writes each row block's partial of eᵀ c into ws (the caller sums ws over its first axis); the
    launch then tunes over the configs with BLOCK_M = FOLD_BLOCK_M only, which ws was sized for."""
    M, N = out.shape
    if M == 0 or N == 0:
        return
    K = a.shape[1]
    has_lowrank = c is not None
    R = c.shape[1] if has_lowrank else 0
    cc = c if has_lowrank else out
    dd = d if has_lowrank else out
    e, ws = fold if fold is not None else (out, out)
    args = (a, b_t, cc, dd, out if bias is None else bias, out, e, ws, M, N, K, R,
            a.stride(0), a.stride(1), b_t.stride(1), b_t.stride(0),
            cc.stride(0), cc.stride(1), dd.stride(0), dd.stride(1), out.stride(0), out.stride(1),
            e.stride(0), e.stride(1), ws.stride(0), ws.stride(1), float(scale))
    dot = tl.float32 if interpreting() else TL_DTYPES[out.dtype]
    flags = dict(HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, HAS_FOLD=fold is not None, DOT_DTYPE=dot,
                 BLOCK_R=pow2_block(R, GEMM_MAX_BLOCK_R))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    configs = gemm_configs(out.dtype)
    if fold is not None:
        configs = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] == FOLD_BLOCK_M]
    configs = fitting(configs, out.device, out.element_size())
    interpret_config = GEMM_INTERPRET_CONFIG if fold is None else {**GEMM_INTERPRET_CONFIG, "BLOCK_M": FOLD_BLOCK_M}
    launch(_tail_gemm_kernel, grid, args, flags, configs, interpret_config, (M, N, K, R), site,
           (out.element_size(), 0))


def tail_adapter_forward(x, weight, bias, P, Q, scale, x_adapter=None):
    """Fused TailLoR forward: returns (y, S) with S = x_a P and y = x Wᵀ + b + s · S Qᵀ.

    x (T, d_in), weight (d_out, d_in), bias (d_out,) or None, P (d_in, r), Q (d_out, r), scale float,
    x_adapter (T, d_in) or None (x_a = x when None). One dtype for all (float32, float16, bfloat16); x,
    x_adapter and weight contiguous in their last dim, P and Q any strides; one CUDA device (any device
    under TRITON_INTERPRET=1). y (T, d_out) and S (T, r) come back in x.dtype; fp32 accumulation.
    Two launches: S (one read of x_a), then the base GEMM with s · S Qᵀ as an extra K-chunk.
    """
    T, d_in, d_out, r = check_adapter_inputs(x, weight, bias, P, Q, x_adapter)
    x_a = x if x_adapter is None else x_adapter
    S = torch.empty((T, r), device=x.device, dtype=x.dtype)
    y = torch.empty((T, d_out), device=x.device, dtype=x.dtype)
    launch_pair(S, [Term(x_a, P)], site="adapter S = x_a P")
    launch_gemm(y, x, weight.t(), S, Q, bias, scale, "fused y = x Wt + s S Qt + b")
    return y, S


def tail_adapter_backward(dy, x, weight, S, P, Q, scale, x_adapter=None,
                          need_dx=True, need_dP=True, need_dQ=True):
    """Fused TailLoR backward: returns (dx, dP, dQ, dx_adapter), the op schema's outputs (one not requested, or
    dx_adapter when x_adapter is None, is an empty 1-D tensor).

    dy (T, d_out), x (T, d_in), weight (d_out, d_in), S (T, r) saved by the forward, P (d_in, r),
    Q (d_out, r), scale float, x_adapter as in the forward. With G = dy Q (fp32):
    dQ = s·dyᵀ S, dP = s·x_aᵀ G; if x_adapter is None, dx = dy W + s·G Pᵀ (one GEMM, extra K-chunk);
    otherwise dx = dy W and dx_adapter = s·G Pᵀ (only when need_dx). dx and dx_adapter in x.dtype, dP and dQ
    in P/Q's dtype; fp32 accumulation. See the module docstring for the derivation.
    """
    T, d_in, d_out, r = check_adapter_backward_inputs(dy, x, weight, S, P, Q, x_adapter)
    dev = x.device
    x_a = x if x_adapter is None else x_adapter
    need_G = need_dx or need_dP
    dx = dP = dQ = dx_adapter = empty_output(dy)
    G = torch.empty((T if need_G else 0, r), device=dev, dtype=torch.float32)
    if need_dQ:
        dQ = torch.empty((d_out, r), device=dev, dtype=Q.dtype)
    # G = dy Q and dQ = s·dyᵀ S in one launch.
    if need_G or need_dQ:
        launch_pair(G, [Term(dy, Q)], 1.0, dQ if need_dQ else None, [Term(dy.t(), S)], scale,
                    site="adapter G = dy Q, dQ = s dyT S")
    if need_dP:
        dP = torch.empty((d_in, r), device=dev, dtype=P.dtype)
        launch_pair(dP, [Term(x_a.t(), G)], scale, site="adapter dP = s x_aT G")
    if need_dx:
        dx = torch.empty((T, d_in), device=dev, dtype=x.dtype)
        if x_adapter is None:
            launch_gemm(dx, dy, weight, G, P, None, scale, "fused dx = dy W + s G Pt")
        else:
            launch_gemm(dx, dy, weight, None, None, None, scale, "fused dx = dy W")
            dx_adapter = torch.empty((T, d_in), device=dev, dtype=x.dtype)
            launch_gemm(dx_adapter, dy[:, :0], weight[:0], G, P, None, scale, "fused dx_a = s G Pt")
    return dx, dP, dQ, dx_adapter
