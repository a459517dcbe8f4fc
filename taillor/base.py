"""The frozen base layer: the one place TailLoR reads or changes the weight it wraps.

TailLoR wraps ``nn.Linear`` and the bitsandbytes quantized linear layers (``Linear4bit``: nf4 / fp4, with or
without double quantization; ``Linear8bitLt``). What the layer, the model API and the saved adapter need from a
base goes through one access object per base kind, listed in :data:`BASE_KINDS`: its sizes, device and dtype, the
dense weight that frames and norms are computed from, the adapted forward, and folding an update into the weight.

* :class:`LinearBase` (``nn.Linear``): the weight is stored densely; merge folds the update into it, and so does
  consolidate on a float32/float64 weight. A bfloat16/float16 weight keeps the finished tasks unfolded, as a frozen
  low-rank term the forward adds (``folds_tasks``, decided when the layer is wrapped): folding rounds a small update
  to the weight's precision (a 1 % update on a bfloat16 weight comes out 17 % off), so a finished task would be
  partly lost.
* :class:`Linear4bitBase`, :class:`Linear8bitBase` (bitsandbytes): :meth:`weight` dequantizes a copy, one layer at
  a time; the forward is the quantized layer's own product plus the rank-r path, so no gradient reaches the packed
  weight; updates never fold into it (that would requantize and lose them): the finished tasks stay a frozen
  low-rank term that the forward adds, exactly. bitsandbytes is optional: these kinds recognise a module only when
  bitsandbytes is already imported (a model holding such a module has imported it), so taillor never imports it.
"""
from __future__ import annotations

import copy
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import taillor_linear


def fold_delta(weight: Tensor, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
    """weight += sign·(up @ down), computed in float32 (float64 for float64 weights) and cast back, in place.

    The one place where an update meets the base weight: merge, unmerge, consolidate and loading an adapter all go
    through it, so replaying a saved record reproduces the weight bit for bit on the same device.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        merged = weight.to(dtype).addmm_(up.to(dtype), down.to(dtype), alpha=sign)
        weight.copy_(merged)


def low_rank_product(x: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """(x downᵀ) upᵀ: x (..., d_in), down (R, d_in), up (d_out, R) -> (..., d_out) in x's dtype, never forming
    up @ down; differentiable in all three."""
    return (x @ down.to(x.dtype).t()) @ up.to(x.dtype).t()


class LinearBase:
    """Access to a frozen ``nn.Linear`` (y = x Wᵀ + b, W (d_out, d_in))."""

    kind = "nn.Linear"
    # Whether the weight is packed: then weight() dequantizes a copy, and updates are not folded into it.
    quantized = False

    def __init__(self, module: nn.Linear):
        self.module = module
        # Whether consolidate folds a finished task into the weight (else the forward adds it, exactly).
        self.folds_tasks = not self.quantized and module.weight.dtype in (torch.float32, torch.float64)

    def with_unfolded_tasks(self, up: Tensor, down: Tensor, tasks_up: Tensor, tasks_down: Tensor):
        """What merge() folds: the current update (up, down), after the finished tasks' factors when the weight does
        not hold them (``folds_tasks`` False), so that the merged weight is everything learned."""
        if self.folds_tasks:
            return up, down
        return torch.cat([tasks_up, up], dim=1), torch.cat([tasks_down, down], dim=0)

    @staticmethod
    def accepts(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the dense weight :meth:`weight` returns."""
        return self.module.weight.dtype

    def weight(self) -> Tensor:
        """The dense weight (d_out, d_in) as stored: frames, norms and the fused forward read it."""
        return self.module.weight

    def bias(self) -> Optional[Tensor]:
        return self.module.bias

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the adapted forward runs in: autocast's, else the weight's."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.module.weight.dtype

    def adapted_forward(self, x: Tensor, P: Tensor, Q: Tensor, scale: float, x_adapter: Optional[Tensor],
                        frozen_up: Tensor, frozen_down: Tensor) -> Tensor:
        """y = x Wᵀ + b + scale·(x_a P) Qᵀ in x's dtype (the fused TailLoR op). x (..., d_in), P (d_in, r),
        Q (d_out, r) in x's dtype. The finished tasks (frozen_up (d_out, R) @ frozen_down (R, d_in)) are added as
        a low-rank term unless they are folded into W (``folds_tasks``)."""
        weight, bias = self.module.weight, self.module.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        y = taillor_linear(x, weight, bias, P, Q, scale, x_adapter)
        if not self.folds_tasks and frozen_down.shape[0]:
            y = y + low_rank_product(x, frozen_up, frozen_down)
        return y

    def fold(self, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
        """W += sign·(up @ down) in place (see :func:`fold_delta`)."""
        fold_delta(self.module.weight, up, down, sign)


class QuantizedBase(LinearBase):
    """Access to a frozen bitsandbytes quantized linear layer (see the module docstring)."""

    quantized = True
    class_name = ""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        bnb = sys.modules.get("bitsandbytes")
        return bnb is not None and isinstance(module, getattr(bnb.nn, cls.class_name))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """autocast's dtype, else x's: the quantized layer casts its output back to its input's dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.is_floating_point() else torch.float32

    def adapted_forward(self, x: Tensor, P: Tensor, Q: Tensor, scale: float, x_adapter: Optional[Tensor],
                        frozen_up: Tensor, frozen_down: Tensor) -> Tensor:
        """y = quantized(x) + (x frozen_downᵀ) frozen_upᵀ + scale·(x_a P) Qᵀ in x's dtype: the quantized layer's
        own product (its bias included), the finished tasks as a frozen low-rank term (exact: never requantized)
        and the current adapter. Gradients reach x, P and Q; the packed weight has none."""
        y = self.module(x).to(x.dtype)
        if frozen_down.shape[0]:
            y = y + low_rank_product(x, frozen_up, frozen_down)
        return y + scale * low_rank_product(x if x_adapter is None else x_adapter, Q, P.t())

    def fold(self, up: Tensor, down: Tensor, sign: float = 1.0) -> None:
        raise TypeError(f"a {self.kind} base is quantized: an update cannot be folded into its weight without "
                        "requantizing it (and losing part of the update). Keep the TailLoR layers (finished tasks "
                        "stay an exact frozen low-rank term), export a PEFT LoRA adapter for the same quantized base "
                        "with taillor.export_lora, merge onto an unquantized copy of the model, or accept the loss "
                        "with taillor.merge_and_requantize (it reports it)")

    def requantize(self, weight: Tensor) -> None:
        """Replace the packed weight by ``weight`` (d_out, d_in), quantized in the layer's own format, in place."""
        raise NotImplementedError


class Linear4bitBase(QuantizedBase):
    """bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double quantization)."""

    kind = "bitsandbytes Linear4bit"
    class_name = "Linear4bit"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight had when it was quantized (what dequantization returns)."""
        state = self.module.weight.quant_state
        return state.dtype if state is not None else self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def weight(self) -> Tensor:
        import bitsandbytes.functional as bnbf
        data, state = self.module.weight.data, self.module.weight.quant_state
        if state is None:
            raise TypeError(f"{self.kind}: the weight is not quantized yet; move the layer to its device first "
                            "(bitsandbytes quantizes on .to(device)), or wrap the float layer")
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _cpu_packing_undone(data, state)
        with torch.no_grad():
            return bnbf.dequantize_4bit(data, state).reshape(self.out_features, self.in_features)

    def requantize(self, weight: Tensor) -> None:
        """``weight`` quantized with this layer's quant type, block size, double quantization and storage."""
        import bitsandbytes as bnb
        old = self.module.weight
        fresh = bnb.nn.Params4bit(weight.detach().to(self.dtype).cpu(), requires_grad=False,
                                  quant_type=old.quant_type, compress_statistics=old.compress_statistics,
                                  blocksize=old.blocksize, quant_storage=old.quant_storage, module=self.module)
        self.module.weight = fresh.to(self.device)  # bitsandbytes quantizes when the parameter moves to a device


def _cpu_packing_undone(data: Tensor, state):
    """(data, quant state) in bitsandbytes' standard 4-bit layout, for a weight that an eval-mode forward on an
    AVX512-BF16 CPU repacked for bitsandbytes' CPU kernel; the layer's own weight and state are left as they are.

    bitsandbytes' inverse rewrites the state it is given, which would leave the layer's repacked weight described
    as unpacked (its next forward garbage), so it runs on a copy. The repacking stored the block scales in bfloat16
    (nesting undone); the inverse would quantize them again for double quantization. They are kept as they are
    instead: the result is the weight the repacked layer computes with, exactly.
    """
    import bitsandbytes.functional as bnbf
    state = copy.copy(state)
    scales = state.absmax.t().reshape(-1).float()  # (d_in / block, d_out) bfloat16 -> row-major blocks, float32
    state.original_nested = False
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax = scales
    return data, state


class Linear8bitBase(QuantizedBase):
    """bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, LLM.int8() inference)."""

    kind = "bitsandbytes Linear8bitLt"
    class_name = "Linear8bitLt"

    def weight(self) -> Tensor:
        import bitsandbytes.functional as bnbf
        packed = self.module.weight
        scales = packed.SCB if getattr(packed, "SCB", None) is not None else self.module.state.SCB
        if packed.dtype != torch.int8 or scales is None:
            raise TypeError(f"{self.kind}: the weight is not int8 (dtype {packed.dtype}): TailLoR wraps int8 "
                            "inference layers (has_fp16_weights=False, moved to their device, where bitsandbytes "
                            "quantizes them); wrap the float layer instead")
        with torch.no_grad():
            return bnbf.int8_vectorwise_dequant(packed.data, scales).float()

    def requantize(self, weight: Tensor) -> None:
        """``weight`` quantized row-wise to int8 (LLM.int8()), with a fresh matmul state (same threshold)."""
        import bitsandbytes as bnb
        old_state = self.module.state
        fresh = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
        state = bnb.MatmulLtState()
        state.threshold, state.has_fp16_weights, state.use_pool = (old_state.threshold, False,
                                                                   old_state.use_pool)
        self.module.state = state
        self.module.weight = fresh.to(self.device)  # bitsandbytes quantizes when the parameter moves to a device


# Quantized kinds first: bitsandbytes' layers subclass nn.Linear.
BASE_KINDS = (Linear4bitBase, Linear8bitBase, LinearBase)
SUPPORTED = "nn.Linear, bitsandbytes Linear4bit or Linear8bitLt"


def is_supported_base(module: nn.Module) -> bool:
    """Whether TailLoR can wrap ``module``."""
    return any(kind.accepts(module) for kind in BASE_KINDS)


def base_for(module: nn.Module, where: str = "TailLoRLinear") -> LinearBase:
    """The access object of ``module``; TypeError naming ``where`` when TailLoR cannot wrap it."""
    for kind in BASE_KINDS:
        if kind.accepts(module):
            return kind(module)
    raise TypeError(f"{where}: TailLoR wraps {SUPPORTED} layers, got {type(module).__name__}")
