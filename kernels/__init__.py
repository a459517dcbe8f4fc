"""Triton kernels of taillor, installed as ``taillor._kernels`` (the bottom layer: tensors and scalars in,
tensors out; no autograd, nothing from ``taillor``).

Launchers:
    tail_adapter_forward, tail_adapter_backward              fused rank-r adapter linear layer
    spectral_projection_forward, spectral_projection_backward  P = V Aᵀ, Q = U B and their gradients
    spectral_penalty_forward, spectral_penalty_backward      the Gram-form spectral penalty

``AOT_KERNELS`` describes every ``@triton.jit`` kernel with representative signatures and constexprs for
ahead-of-time compilation (``taillor check-kernels``): one entry per kernel, call-site variant and dtype
(float32, float16, bfloat16), compiled with the autotuning config that needs the most shared memory.
Without TRITON_INTERPRET=1 the launchers need CUDA tensors; with it they run on the CPU.
"""
import inspect

import triton.language as tl

from . import spectral_penalty as _penalty
from . import spectral_projection as _projection
from . import tail_adapter as _adapter
from .spectral_penalty import spectral_penalty_backward, spectral_penalty_forward
from .spectral_projection import spectral_projection_backward, spectral_projection_forward
from .tail_adapter import tail_adapter_backward, tail_adapter_forward

__all__ = [
    "AOT_KERNELS",
    "spectral_penalty_backward",
    "spectral_penalty_forward",
    "spectral_projection_backward",
    "spectral_projection_forward",
    "tail_adapter_backward",
    "tail_adapter_forward",
]

def _largest_config(configs, n_width):
    """The autotuning config with the largest pipelined shared-memory footprint (per element)."""
    def footprint(cfg):  # software pipelining keeps num_stages - 1 operand buffers in shared memory
        kw = cfg.kwargs
        return (kw["BLOCK_M"] + kw.get("BLOCK_N", n_width)) * kw["BLOCK_K"] * max(cfg.num_stages - 1, 1)
    return max(configs, key=footprint)


def _signature(fn, pointer_types, floats, constexprs):
    """{arg name: type} for every parameter of ``fn``: pointers from ``pointer_types`` (name → dtype),
    names in ``floats`` "fp32", other runtime scalars "i32", constexprs "constexpr". Raises KeyError when
    an entry drifts from the kernel (a pointer, or a constexpr, that is missing or unknown)."""
    # Parameters come from the Python function: that works for the JITFunction and, under
    # TRITON_INTERPRET=1, for the InterpretedFunction that ``triton.jit`` returns instead.
    params = inspect.signature(fn.fn).parameters.values()
    is_constexpr = {p.name: p.annotation is tl.constexpr or p.annotation in ("tl.constexpr", "constexpr")
                    for p in params}
    expected = {n for n, c in is_constexpr.items() if c}
    pointers = {n for n, c in is_constexpr.items() if not c and n.endswith("_ptr")}
    if expected != set(constexprs) or pointers != set(pointer_types):
        raise KeyError(f"AOT entry for {fn.__name__} does not match the kernel: constexprs "
                       f"{sorted(expected ^ set(constexprs))}, pointers {sorted(pointers ^ set(pointer_types))}")
    sig = {}
    for name, constexpr in is_constexpr.items():
        if constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointer_types[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _entry(name, fn, dtype, variant, pointer_types, floats, constexprs, config=None, num_warps=4, num_stages=2):
    if config is not None:
        constexprs = {**constexprs, **config.kwargs}
        num_warps, num_stages = config.num_warps, config.num_stages
    return {
        "name": name,
        "variant": variant,
        "dtype": dtype,
        "fn": fn,
        "signature": _signature(fn, pointer_types, floats, constexprs),
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def _aot_kernels():
    entries = []
    gemm_cfg = _largest_config(_adapter._GEMM_CONFIGS, 128)
    pair_cfg = _largest_config(_projection._PAIR_CONFIGS, _projection._MAX_BLOCK_N)
    gemm = _adapter._tail_gemm_kernel
    pair = _projection._pair_kernel
    gram = _penalty._penalty_gram_kernel
    for t in ("fp32", "fp16", "bf16"):  # Triton type names of the input dtype
        # The superset of the forward (y = x Wᵀ + b + s·S Qᵀ) and dx (dy W + s·G Pᵀ, G fp32) call sites.
        entries.append(_entry("_tail_gemm_kernel", gemm, t, "y / dx",
                              dict(a_ptr=t, b_ptr=t, c_ptr="fp32", d_ptr=t, bias_ptr=t, out_ptr=t), ("scale",),
                              dict(HAS_BIAS=True, HAS_LOWRANK=True, UPCAST=False,
                                   BLOCK_R=_adapter._MAX_BLOCK_R), gemm_cfg))
        pair_floats = ("alpha_a", "alpha_b")
        # Single-term products in the input dtype: adapter S, G = dy Q (fp32 out), dQ, dP; projection.
        entries.append(_entry("_pair_kernel", pair, t, "adapter / projection",
                              dict(xa1_ptr=t, ya1_ptr=t, xa2_ptr="fp32", ya2_ptr="fp32", oa_ptr="fp32",
                                   xb1_ptr=t, yb1_ptr=t, xb2_ptr=t, yb2_ptr=t, ob_ptr=t,
                                   w_ptr="fp32", g_ptr="fp32"),
                              pair_floats,
                              dict(A_RS1=False, A_RS2=False, B_RS1=False, B_RS2=False, HAS_G=False,
                                   TWO_TERMS=False, UPCAST=False, BLOCK_N=_projection._MAX_BLOCK_N), pair_cfg))
        # Penalty gradients: two terms, fp32 Grams, row scales by ω², device scalar g, fp32 arithmetic.
        entries.append(_entry("_pair_kernel", pair, t, "penalty grad",
                              dict(xa1_ptr=t, ya1_ptr="fp32", xa2_ptr=t, ya2_ptr="fp32", oa_ptr=t,
                                   xb1_ptr=t, yb1_ptr="fp32", xb2_ptr=t, yb2_ptr="fp32", ob_ptr=t,
                                   w_ptr="fp32", g_ptr="fp32"),
                              pair_floats,
                              dict(A_RS1=False, A_RS2=True, B_RS1=True, B_RS2=False, HAS_G=True,
                                   TWO_TERMS=True, UPCAST=True, BLOCK_N=_penalty._MAX_BLOCK_R),
                              _projection._PAIR_FP32_CONFIG))
        # Gram kernel: full mode value (one pass over k) and head mode Grams.
        gram_block = dict(BLOCK_R=_penalty._MAX_BLOCK_R, BLOCK_L=_penalty._BLOCK_L)
        gram_launch = dict(num_warps=_penalty._GRAM_WARPS, num_stages=_penalty._GRAM_STAGES)
        entries.append(_entry("_penalty_gram_kernel", gram, t, "full value",
                              dict(xb_ptr=t, xa_ptr=t, xbh_ptr=t, xah_ptr=t, w_ptr="fp32", out_ptr="fp32"),
                              ("coeff",), dict(FULL=True, STORE_GRAMS=False, **gram_block), **gram_launch))
        entries.append(_entry("_penalty_gram_kernel", gram, t, "head grams",
                              dict(xb_ptr=t, xa_ptr=t, xbh_ptr="fp32", xah_ptr="fp32", w_ptr="fp32",
                                   out_ptr="fp32"),
                              ("coeff",), dict(FULL=False, STORE_GRAMS=True, **gram_block), **gram_launch))
    return entries


AOT_KERNELS = _aot_kernels()
