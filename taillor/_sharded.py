"""Sharded parameters (FSDP2's DTensors): what the layer and the model API need to work on a sharded model without
the user gathering anything.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a DTensor sharded across ranks outside
forward and backward, and that shard is the only copy that persists. Whole-tensor operations of a TailLoR layer
(consolidate, merge, reset, export, load) run inside :func:`gathered`: the layer's sharded parameters are replaced by
full copies (an all-gather), the unchanged single-process code runs on them, and each rank writes its own shard of
the result back. Every rank computes the same full values, so no further communication is needed. Files are
written by rank 0 alone (:func:`write_once`). Buffers (the frame, the consolidated factors, λ) are not sharded by
FSDP2: every rank holds them whole.

Everything here is a collective on a sharded model: every rank must call it, as with FSDP's own state-dict calls.
Nothing here imports torch.distributed unless it is available, and a model without DTensors takes no other path.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2, say)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: ``t`` itself, or a DTensor's all-gathered value (differentiable: the backward
    reduce-scatters the gradient back to the shards). A collective for a DTensor."""
    return t.full_tensor() if is_sharded(t) else t


def has_sharded_parameters(module: nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def reshard(model: nn.Module) -> bool:
    """Put every FSDP2 module of ``model`` back in its sharded state (a no-op for one already sharded), so that its
    parameters are the DTensors whose shards persist: an unsharded copy left by a forward without backward is
    freed, not changed. Returns whether the model has sharded parameters."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return has_sharded_parameters(model)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Within the block, every sharded parameter of ``module`` is a plain full-size parameter (same requires_grad)
    on every rank. On normal exit each rank copies its own shard of the (possibly changed) values into the DTensor,
    which takes its place again: the optimizer and FSDP keep the same parameter object. On an exception the
    DTensors are put back as they were. A no-op without sharded parameters; nested uses gather once."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield  # no process group, so nothing can be sharded
        return
    from torch.distributed.fsdp import FSDPModule
    if isinstance(module, FSDPModule):
        module.reshard()
    sharded = [(name, p) for name, p in module.named_parameters() if is_sharded(p)]
    if not sharded:
        yield
        return
    owners = []
    for name, p in sharded:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        with torch.no_grad():
            whole = nn.Parameter(p.full_tensor().clone(), requires_grad=p.requires_grad)
        setattr(owner, attr, whole)
        owners.append((owner, attr, p))
    try:
        yield
    except BaseException:
        for owner, attr, p in owners:
            setattr(owner, attr, p)
        raise
    from torch.distributed.tensor import distribute_tensor
    for owner, attr, p in owners:
        whole = getattr(owner, attr)
        # src_data_rank=None: each rank cuts its shard from its own (identical) copy, without communication.
        mine = distribute_tensor(whole.detach(), p.device_mesh, p.placements, src_data_rank=None).to_local()
        with torch.no_grad():
            p.to_local().copy_(mine)
        setattr(owner, attr, p)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def write_once(model_is_sharded: bool, device: torch.device, write: Callable[[], None]) -> None:
    """Run ``write`` (files) on rank 0 only when the model is sharded (every rank called the gathering before it and
    holds the same values), then tell every rank whether it succeeded: all ranks return once the files exist, or
    all raise. Without sharding, ``write`` runs on the calling rank as in one process. ``device``: where the
    process group's backend takes tensors (the sharded parameters' device)."""
    import torch.distributed as dist
    if not model_is_sharded or not dist.is_initialized():
        write()
        return
    failed = torch.zeros((), dtype=torch.int32, device=device)
    error = None
    if _rank() == 0:
        try:
            write()
        except Exception as caught:  # reported to every rank below, then raised here
            error = caught
            failed.fill_(1)
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError("rank 0 could not write the files; its own error says why")


def local_device(model: nn.Module) -> torch.device:
    """The device of the local shards of ``model``'s sharded parameters (the process group's)."""
    for p in model.parameters():
        if is_sharded(p):
            return p.to_local().device
    return torch.device("cpu")
