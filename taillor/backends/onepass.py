"""Onepass route of the adapter op (``taillor._kernels.tail_adapter_onepass``): the fused route's forward; in the
backward dy is read once for G = dy Q and dQ, and dP is folded into the dx GEMM. Same schema and autograd as the
other routes.

Route choice (``TAILLOR_ADAPTER_IMPL=auto``, the default): a static rule from the byte and FLOP model of
``taillor bench --roofline`` (taillor/bench/roofline.py). The model puts the onepass route below the split and
fused routes at every shape (it reads and writes fewer activations: one extra read each of x, dy and x_a against
the frozen layer, where split also rewrites y and dx and reads dy twice), but it leaves out what a model cannot
know without a GPU: per-launch latency and the gap between a Triton GEMM and cuBLAS. Both weigh most on small
problems, where the bytes saved are a few microseconds. So the rule is: onepass when the layer step is large —
at least ``MIN_TOKENS`` tokens through a weight of at least ``MIN_WEIGHT`` elements, rank at most
``ONEPASS_MAX_R`` — and split (cuBLAS for the base products) otherwise. The thresholds are the model's side of the
decision, not measurements; ``benchmarks/gpu_check.sh`` times every route, and a measured crossover replaces them.
"""
from __future__ import annotations

from . import register_impl, triton_kernels, triton_unavailable
from .triton import FLOAT_DTYPES

MIN_TOKENS = 2048
MIN_WEIGHT = 2048 * 2048
ONEPASS_MAX_R = 64  # the dy pass keeps the whole rank in one tile (kernels/launch.py)
PRIORITY = 20  # above split (10) and fused (0): the first candidate whenever its predicate holds


def large_step(tokens: int, weight_numel: int, rank: int) -> bool:
    """The static rule: True when the onepass route should run a layer step of this size."""
    return tokens >= MIN_TOKENS and weight_numel >= MIN_WEIGHT and rank <= ONEPASS_MAX_R


def _forward_rule(x, weight, bias, P, *rest) -> bool:
    return large_step(x.shape[0], weight.numel(), P.shape[1])


def _backward_rule(dy, x, weight, S, P, *rest) -> bool:
    return large_step(dy.shape[0], weight.numel(), P.shape[1])


for _op, _launcher, _rule in (("tail_adapter_fwd", "tail_adapter_onepass_forward", _forward_rule),
                              ("tail_adapter_bwd", "tail_adapter_onepass_backward", _backward_rule)):
    register_impl(_op, "triton-onepass", ("cuda",), (lambda name=_launcher: getattr(triton_kernels(), name)),
                  family="triton", dtypes=FLOAT_DTYPES, route="onepass", available=triton_unavailable,
                  priority=PRIORITY, predicate=_rule)
