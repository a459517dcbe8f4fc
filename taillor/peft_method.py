"""TailLoR as a PEFT method: ``peft.get_peft_model(model, TailLoRPeftConfig(...))``.

Importing this module registers the method with PEFT (``peft_type="TAILLOR"``); import it before
``peft.PeftModel.from_pretrained`` loads a TailLoR adapter. Importing :mod:`taillor` alone never imports PEFT.

The same :class:`~taillor.layer.TailLoRLinear` sits underneath as with :func:`taillor.apply_taillor`: the tuner
injects the adapter by calling ``apply_taillor`` (its target matching, frames and layer), so everything of taillor
(``spectral_penalty``, ``consolidate``, ``attach_penalty``, the callback) works on the PEFT-wrapped model.

Saved adapter (``PeftModel.save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``): per layer
``<name>.<part>`` for each part of the layer's record (:meth:`TailLoRLinear.export_record`: lora_P, lora_Q,
consolidated_up, consolidated_down), its meta as 0-dim tensors (tasks_consolidated, merged, base_weight_norm,
penalty_strength), ``base_sketch`` (the base weight's sketch, :func:`taillor.record.base_sketch`) and the trainable
factors ``lora_A``, ``lora_B``. Loading replays the record (finished tasks
folded into the base weight, λ restored) and then takes A and B exactly as saved when the loading machine's frame
reproduces the saved P and Q bit for bit (same device and routine); otherwise A and B are re-expressed from P, Q
in the recomputed frame (the ``reloaded`` tolerance), as :func:`taillor.load_adapter` does.

One adapter per model: a second adapter name (``add_adapter``, ``load_adapter`` under another name,
``set_adapter`` to it), ``delete_adapter``, ``unload`` and ``low_cpu_mem_usage`` raise
:class:`UnsupportedPeftFeature` (``disable_adapter`` too, or PEFT's own ValueError first: its layer-status check
knows only PEFT's layer classes). For serving, merge (``merge_and_unload``) or export a plain LoRA adapter with
``taillor.export_lora(peft_model.get_base_model(), directory)``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn

from .config import TailLoRConfig
from .layer import TailLoRLinear
from .model import apply_taillor, iter_taillor_layers, merge_and_unload as merge_all
from .record import RECORD_TENSORS, check_record

NAME = "taillor"
PEFT_TYPE = NAME.upper()
# Per-layer meta of the record, stored as 0-dim tensors (safetensors has no per-tensor metadata).
_META = {"tasks_consolidated": torch.int64, "merged": torch.int64, "base_weight_norm": torch.float64,
         "penalty_strength": torch.float64}
_FACTORS = ("lora_A", "lora_B")
_SKETCH = "base_sketch"  # (SKETCH_SIZE²,) float64; absent in adapters saved before it existed
_PEFT_PREFIX = "base_model.model."


class UnsupportedPeftFeature(NotImplementedError):
    """A PEFT feature TailLoR does not offer (one adapter per model; no disabling or unloading)."""


def _add_peft_type() -> PeftType:
    """PeftType.TAILLOR: PEFT's registry only accepts names of its PeftType enum, which has no public way to grow."""
    if PEFT_TYPE in PeftType.__members__:
        return PeftType[PEFT_TYPE]
    member = str.__new__(PeftType, PEFT_TYPE)
    member._name_, member._value_ = PEFT_TYPE, PEFT_TYPE
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(PEFT_TYPE, member)
    else:
        PeftType._member_names_.append(PEFT_TYPE)
        PeftType._member_map_[PEFT_TYPE] = member
        type.__setattr__(PeftType, PEFT_TYPE, member)
    PeftType._value2member_map_[PEFT_TYPE] = member
    return member


def _post_init(self) -> None:
    self.peft_type = _add_peft_type()
    PeftConfig.__post_init__(self)
    if isinstance(self.target_modules, list):
        self.target_modules = tuple(self.target_modules)
    if self.target_modules is not None:
        self.to_taillor_config()  # TailLoRConfig's checks, with its typed errors, at construction


def _to_taillor_config(self) -> TailLoRConfig:
    """The :class:`TailLoRConfig` of this PEFT config: the one conversion between the two."""
    return TailLoRConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TailLoRConfig)})


def _peft_config_class():
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(TailLoRConfig)]
    return dataclasses.make_dataclass(
        "TailLoRPeftConfig", fields, bases=(PeftConfig,),
        namespace={"__post_init__": _post_init, "to_taillor_config": _to_taillor_config,
                   "__module__": __name__,
                   "__doc__": "PEFT config of TailLoR: :class:`taillor.TailLoRConfig`'s fields under the same names "
                              "(rank, alpha, target_modules, frame, head, penalty, head_share_target, ...) plus "
                              "PEFT's own (task_type, inference_mode, base_model_name_or_path, ...). "
                              "``target_modules=None`` takes PEFT's LoRA default for the model type. "
                              "``to_taillor_config()`` converts."})


TailLoRPeftConfig = _peft_config_class()


def _unsupported(what: str) -> UnsupportedPeftFeature:
    return UnsupportedPeftFeature(f"TailLoR under PEFT supports one adapter per model and no {what}; merge "
                                  "(merge_and_unload), consolidate between tasks (taillor.consolidate), or export a "
                                  "plain LoRA adapter (taillor.export_lora(peft_model.get_base_model(), dir))")


class TailLoRTuner(BaseTuner):
    """PEFT's tuner for TailLoR: injects :class:`TailLoRLinear` with :func:`taillor.apply_taillor` and stores each
    layer's record (see the module docstring)."""

    prefix: str = f"{NAME}_"
    tuner_layer_cls = TailLoRLinear
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ---------------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError("TailLoRPeftConfig.target_modules is required for a model without PEFT's default "
                                 "targets: a list of module names, a regex, or 'all-linear'")
            peft_config = dataclasses.replace(peft_config, target_modules=tuple(targets))
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        if len(self.peft_config) > 1 or any(True for _ in iter_taillor_layers(model)):
            raise _unsupported(f"second adapter ({adapter_name!r})")
        if low_cpu_mem_usage:
            raise _unsupported("low_cpu_mem_usage (frames are computed from the real weights)")
        config = self._prepare_adapter_config(self.peft_config[adapter_name], self.get_model_config(model))
        self.peft_config[adapter_name] = config
        apply_taillor(model, config.to_taillor_config())
        self.targeted_module_names = [name for name, _ in iter_taillor_layers(model)]
        if config.inference_mode:
            self._set_trainable(False)

    def _create_and_replace(self, *args, **kwargs):  # abstract in BaseTuner; injection is apply_taillor's
        raise NotImplementedError("TailLoR layers are injected by taillor.apply_taillor")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        self._set_trainable(True)

    def _set_trainable(self, trainable: bool) -> None:
        for _, layer in iter_taillor_layers(self.model):
            layer.lora_A.requires_grad_(trainable)
            layer.lora_B.requires_grad_(trainable)

    # ---------------------------------------------------------------------------------------------- adapters
    def _check_name(self, adapter_name) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != list(self.peft_config):
            raise _unsupported(f"adapter switching ({names} requested, the model holds {list(self.peft_config)})")

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        self._check_name(adapter_name)
        self._set_trainable(not inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self._check_name(adapter_names)
        self._set_trainable(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        raise _unsupported("delete_adapter")

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            raise _unsupported("disable_adapter (finished tasks live in the base weight)")

    def unload(self) -> nn.Module:
        raise _unsupported("unload (finished tasks live in the base weight)")

    # ---------------------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        for _, layer in iter_taillor_layers(self.model):
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in iter_taillor_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge every TailLoR layer (finished tasks and the current adapter) and return the plain model."""
        return merge_all(self.model)

    # ---------------------------------------------------------------------------------------------- state
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = {}
        for name, layer in iter_taillor_layers(model):
            record, meta = layer.export_record()
            out.update({f"{name}.{part}": t.clone() for part, t in record.items()})
            out.update({f"{name}.{key}": torch.tensor(meta[key], dtype=dtype) for key, dtype in _META.items()})
            out[f"{name}.{_SKETCH}"] = torch.tensor(meta[_SKETCH], dtype=torch.float64)
            out.update({f"{name}.{part}": getattr(layer, part).detach().cpu().clone() for part in _FACTORS})
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # one adapter per model: keys never hold its name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Loads the records into the model's TailLoR layers (all checked before any changes) and returns what is
        left for PEFT's ``load_state_dict``: nothing."""
        layers = {name.removeprefix(_PEFT_PREFIX): layer for name, layer in iter_taillor_layers(model)}
        prefix = _PEFT_PREFIX if all(k.startswith(_PEFT_PREFIX) for k in state_dict) else ""
        parts = RECORD_TENSORS + tuple(_META) + _FACTORS
        expected = {f"{prefix}{name}.{part}" for name in layers for part in parts}
        sketches = {f"{prefix}{name}.{_SKETCH}" for name in layers}
        if set(state_dict) - sketches != expected:
            missing = sorted(expected - set(state_dict))[:5]
            unexpected = sorted(set(state_dict) - expected - sketches)[:5]
            raise ValueError(f"the TailLoR adapter does not match the model: missing {missing}, unexpected "
                             f"{unexpected}")
        records = {}
        for name, layer in layers.items():
            if layer.tasks_consolidated or layer.merged:
                raise ValueError(f"{name}: loading a TailLoR adapter needs a fresh TailLoR layer; this one is merged "
                                 "or consolidated")
            entry = {part: state_dict[f"{prefix}{name}.{part}"] for part in parts}
            meta = {key: entry[key].item() for key in _META}
            meta["merged"] = bool(meta["merged"])
            if f"{prefix}{name}.{_SKETCH}" in state_dict:
                meta[_SKETCH] = state_dict[f"{prefix}{name}.{_SKETCH}"].tolist()
            P, Q = entry["lora_P"], entry["lora_Q"]
            meta.update(d_in=P.shape[0], d_out=Q.shape[0], rank=P.shape[1])
            check_record(name, layer.base_layer, entry, meta, layer.config)
            records[name] = entry, meta
        for name, layer in layers.items():
            _load_layer(layer, *records[name])
        return {}


def _load_layer(layer: TailLoRLinear, entry: dict, meta: dict) -> None:
    """Replay the record, then take A and B exactly as saved when this frame reproduces the saved P, Q."""
    layer.load_record(entry, dict(meta, merged=False))
    # fresh copies: BLAS may round differently on the (unaligned) memory a safetensors file is read into
    A, B = (entry[part].to(device=layer.lora_A.device, dtype=layer.lora_A.dtype, copy=True) for part in _FACTORS)
    if A.shape == layer.lora_A.shape and B.shape == layer.lora_B.shape:
        with torch.no_grad():
            P, Q = layer.frame_mode.layer_factors(A, B, layer.frame, None)
        if torch.equal(P.cpu(), entry["lora_P"].to(P.dtype)) and torch.equal(Q.cpu(), entry["lora_Q"].to(Q.dtype)):
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
    if meta["merged"]:
        layer.merge()


_add_peft_type()
register_peft_method(name=NAME, config_cls=TailLoRPeftConfig, model_cls=TailLoRTuner)
