"""Triton kernels: the TailLoR adapter's onepass route — each activation read as few times as the math allows.

Math and derivation as the fused route (kernels/tail_adapter.py): x (T, d_in), frozen W (d_out, d_in),
P (d_in, r), Q (d_out, r), scale s, x_a = x or x_adapter; S = x_a P, y = x Wᵀ + b + s·S Qᵀ; with G = dy Q:
dQ = s·dyᵀ S, dP = s·x_aᵀ G, dx = dy W + s·G Pᵀ (dx_a = s·G Pᵀ apart when x_a is not x).

Work split (a graph split in the manner of LoRAFusion: memory-bound rank-r work in its own pass, the rank-r
product as an extra K-chunk of the big GEMMs so y and dx are written once):

    forward    S = x_a P                   one read of x_a (the pair kernel)
               y = x Wᵀ + b + s·S Qᵀ       one GEMM, s·S Qᵀ as an extra K-chunk (the fused route's forward)
    backward   G = dy Q and the row-chunk partials of dyᵀ S
                                           ONE read of dy (``_dy_pass_kernel``, below)
               dx = dy W + s·G Pᵀ          one GEMM with the extra K-chunk, which also reads each (row block,
                                           column block) tile of x_a once and writes that row block's partial of
                                           x_aᵀ G: dP costs no pass of its own over x_a, only a workspace
               dQ = s·Σ partials, dP = s·Σ partials   small fp32 sums

Against the fused route this saves one read of dy (G and dQ there are two program groups that each read dy) and
the separate pass over x_a for dP. The byte and FLOP model of every route is in taillor/bench/roofline.py.

``_dy_pass_kernel``. Program (i, j) of a (n_i, n_j) grid owns row chunk i of dy (whole BLOCK_M blocks) and
column chunk j (whole BLOCK_N blocks). For each row block m of its chunk it accumulates
G_j[m] = Σ_{n in chunk j} dy[m, n] Q[n] in registers and stores it to the fp32 workspace Gw[j]; for each tile it
adds dy[m, n]ᵀ S[m] to its own slice Qw[i, n] of the dQ workspace (read-modify-write: the slice belongs to this
program alone, and a barrier after each row block orders its rewrites). The host sums Gw over j and Qw over i:
deterministic, no atomics. The grid is chosen so that n_i·n_j ≈ the SM count with n_i / n_j ≈ T / d_out,
which minimises the workspaces (n_j·T + n_i·d_out)·r fp32 for that many programs.

Precision: fp32 accumulation; G and the partials stay fp32; the tile operands go to tl.dot in the inputs' 16-bit
dtype on the GPU (tensor cores), IEEE fp32 for fp32 inputs, fp32 under the interpreter (which upcasts).
Ranks above ONEPASS_MAX_R take the fused route's backward (the dy pass keeps the whole rank in one tile).
"""
import math

import torch
import triton
import triton.language as tl

from .checks import check_adapter_backward_inputs
from .launch import (DY_PASS_CONFIGS, DY_PASS_INTERPRET_CONFIG, FOLD_BLOCK_M, ONEPASS_MAX_R, TL_DTYPES,
                     device_info, empty_output, fitting, interpreting, launch, pow2_block)
from .pair_gemm import Term, launch_pair
from .tail_adapter import launch_gemm, tail_adapter_backward, tail_adapter_forward


@triton.jit
def _dy_pass_kernel(dy_ptr, q_ptr, s_ptr, gw_ptr, qw_ptr, T, N, R,
                    s_dym, s_dyn, s_qn, s_qr, s_sm, s_sr, s_gwj, s_gwm, s_qwi, s_qwn,
                    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    # Gw[j, m, :] = Σ_{n in chunk j} dy[m, n] Q[n, :];  Qw[i, n, :] += Σ_{m in chunk i} dy[m, n] S[m, :].
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    blocks_i = tl.cdiv(tl.cdiv(T, BLOCK_M), tl.num_programs(0))
    blocks_j = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1))
    row0 = pid_i * blocks_i * BLOCK_M
    row_end = tl.minimum(T, row0 + blocks_i * BLOCK_M)
    col0 = pid_j * blocks_j * BLOCK_N
    col_end = tl.minimum(N, col0 + blocks_j * BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = offs_r < R
    for m0 in range(row0, row_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < row_end
        s_tile = tl.load(s_ptr + offs_m[:, None] * s_sm + offs_r[None, :] * s_sr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        g_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(col0, col_end, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask_n = offs_n < col_end
            dy = tl.load(dy_ptr + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            q = tl.load(q_ptr + offs_n[:, None] * s_qn + offs_r[None, :] * s_qr,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            g_acc = tl.dot(dy, q, g_acc, input_precision="ieee")
            qw_ptrs = qw_ptr + pid_i.to(tl.int64) * s_qwi + offs_n[:, None] * s_qwn + offs_r[None, :]
            mask_nr = mask_n[:, None] & mask_r[None, :]
            part = tl.load(qw_ptrs, mask=mask_nr, other=0.0)
            part = tl.dot(tl.trans(dy), s_tile, part, input_precision="ieee")
            tl.store(qw_ptrs, part, mask=mask_nr)
        tl.store(gw_ptr + pid_j.to(tl.int64) * s_gwj + offs_m[:, None] * s_gwm + offs_r[None, :], g_acc,
                 mask=mask_m[:, None] & mask_r[None, :])
        # The next row block rewrites the same Qw tiles: every thread's store must land before any reload.
        tl.debug_barrier()


def dy_pass_grid(T: int, N: int, sm_count) -> tuple[int, int]:
    """(n_i, n_j) programs of the dy pass: about one per SM (the fewer programs, the smaller the workspaces; each
    streams whole tiles of dy), n_i / n_j ≈ T / N (the smallest workspaces for that
    many programs), never more chunks than 64-row / 128-column blocks. Without a device (the interpreter) chunks
    of two blocks each way, so that the tests run the read-modify-write and both reductions."""
    if not sm_count:
        return (max(1, triton.cdiv(T, 2 * DY_PASS_INTERPRET_CONFIG["BLOCK_M"])),
                max(1, triton.cdiv(N, 2 * DY_PASS_INTERPRET_CONFIG["BLOCK_N"])))
    programs = sm_count
    n_j = max(1, min(triton.cdiv(N, 128), round(math.sqrt(programs * N / max(T, 1)))))
    n_i = max(1, min(triton.cdiv(T, 64), triton.cdiv(programs, n_j)))
    return n_i, n_j


def dy_pass(dy, Q, S, scale, need_dQ):
    """(G (T, r) fp32, dQ (d_out, r) in Q's dtype or None) = (dy Q, s·dyᵀ S) in one read of dy."""
    T, N = dy.shape
    r = Q.shape[1]
    info = device_info(dy.device)
    n_i, n_j = dy_pass_grid(T, N, info.sm_count if info else None)
    gw = torch.empty((n_j, T, r), device=dy.device, dtype=torch.float32)
    qw = torch.zeros((n_i, N, r), device=dy.device, dtype=torch.float32)
    block_r = pow2_block(r, ONEPASS_MAX_R)
    if T and N and r:
        dot = tl.float32 if interpreting() else TL_DTYPES[dy.dtype]
        args = (dy, Q, S, gw, qw, T, N, r, dy.stride(0), dy.stride(1), Q.stride(0), Q.stride(1),
                S.stride(0), S.stride(1), gw.stride(0), gw.stride(1), qw.stride(0), qw.stride(1))
        configs = fitting(DY_PASS_CONFIGS, dy.device, dy.element_size(), block_r)
        launch(_dy_pass_kernel, lambda meta: (n_i, n_j), args, dict(DOT_DTYPE=dot, BLOCK_R=block_r), configs,
               DY_PASS_INTERPRET_CONFIG, (T, N, r), "onepass G = dy Q, dQ partials", (dy.element_size(), block_r))
    else:
        gw.zero_()
    G = gw[0] if n_j == 1 else gw.sum(0)
    dQ = qw.sum(0).mul_(scale).to(Q.dtype) if need_dQ else None
    return G, dQ


def tail_adapter_onepass_forward(x, weight, bias, P, Q, scale, x_adapter=None):
    """Onepass-route forward: the fused route's (S = x_a P, then y = x Wᵀ + b + s·S Qᵀ in one GEMM); inputs and
    outputs as :func:`taillor._kernels.tail_adapter_forward`."""
    return tail_adapter_forward(x, weight, bias, P, Q, scale, x_adapter)


def tail_adapter_onepass_backward(dy, x, weight, S, P, Q, scale, x_adapter=None,
                                  need_dx=True, need_dP=True, need_dQ=True):
    """Onepass-route backward: (dx, dP, dQ, dx_adapter) as :func:`taillor._kernels.tail_adapter_backward`
    (shapes, dtypes, empty outputs), with dy read once for G and dQ and dP folded into the dx GEMM."""
    T, d_in, d_out, r = check_adapter_backward_inputs(dy, x, weight, S, P, Q, x_adapter)
    if r > ONEPASS_MAX_R:
        return tail_adapter_backward(dy, x, weight, S, P, Q, scale, x_adapter, need_dx, need_dP, need_dQ)
    dev = x.device
    x_a = x if x_adapter is None else x_adapter
    dx = dP = dQ = dx_adapter = empty_output(dy)
    if not (need_dx or need_dP or need_dQ):
        return dx, dP, dQ, dx_adapter
    G, dQ_full = dy_pass(dy, Q, S, scale, need_dQ)
    if need_dQ:
        dQ = dQ_full
    fold = None
    if need_dP:
        if need_dx:  # dP's row-block partials come out of the dx GEMM, which reads x_a's tiles for it
            fold = (x_a, torch.empty((triton.cdiv(T, FOLD_BLOCK_M), d_in, r), device=dev, dtype=torch.float32))
        else:
            dP = torch.empty((d_in, r), device=dev, dtype=P.dtype)
            launch_pair(dP, [Term(x_a.t(), G)], scale, site="adapter dP = s x_aT G")
    if need_dx:
        dx = torch.empty((T, d_in), device=dev, dtype=x.dtype)
        if x_adapter is None:
            launch_gemm(dx, dy, weight, G, P, None, scale, "onepass dx = dy W + s G Pt, dP partials", fold)
        else:
            launch_gemm(dx, dy, weight, None, None, None, scale, "fused dx = dy W")
            dx_adapter = torch.empty((T, d_in), device=dev, dtype=x.dtype)
            launch_gemm(dx_adapter, dy[:, :0], weight[:0], G, P, None, scale, "onepass dx_a = s G Pt, dP partials",
                         fold)
    if fold is not None:
        ws = fold[1]
        dP = (ws[0] if ws.shape[0] == 1 else ws.sum(0)).mul_(scale).to(P.dtype)
    return dx, dP, dQ, dx_adapter
