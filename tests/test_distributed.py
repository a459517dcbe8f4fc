"""DDP and FSDP2 with gloo on 2 CPU processes train exactly like one process on the whole batch; frame
construction sharded across ranks gives every rank every frame."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import taillor
from conftest import assert_close

pytestmark = pytest.mark.distributed
STEPS, BATCH = 4, 8


ENERGY_CONFIG = taillor.TailLoRConfig(frame="full", head_energy=0.5)


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    return taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=3, penalty=1e-2, target_modules=["0", "2"]))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, generator=g), torch.randn(BATCH, 6, generator=g)


def train(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(STEPS):
        loss = (model(x) - y).pow(2).mean() + taillor.spectral_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def adapter_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.replace("module.", "")] = full.detach().clone()
    return out


def _worker(rank, world, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        x, y = batch()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
            train_target = wrapped
        elif mode == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for layer in model:
                if isinstance(layer, taillor.TailLoRLinear):
                    fully_shard(layer)
            fully_shard(model)
            train_target = model
        if mode == "frames":
            torch.manual_seed(3)
            weights = {f"w{i}": torch.randn(16 + i % 2, 24) for i in range(5)}
            frames = taillor.frame.build_frames(weights, taillor.TailLoRConfig(frame="head", head=3))
            state = {f"{n}.{part}": getattr(f, part).clone() for n, f in frames.items() for part in ("U", "S", "V")}
            # Full frame with head_energy: h comes from each frame's spectrum, also on the ranks that receive it.
            full = taillor.frame.build_frames(weights, ENERGY_CONFIG)
            state.update({f"full.{n}.h": torch.tensor(f.head_size) for n, f in full.items()})
        else:
            # The penalty is summed per rank and gradients are averaged, so it enters once, as in one process.
            params = [p for p in train_target.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=0.1)
            for _ in range(STEPS):
                loss = (train_target(x[shard]) - y[shard]).pow(2).mean() + taillor.spectral_penalty(model)
                opt.zero_grad()
                loss.backward()
                opt.step()
            state = adapter_state(train_target)
        if rank == 0:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(mode, tmp_path):
    out = str(tmp_path / f"{mode}.safetensors")
    mp.spawn(_worker, args=(2, _free_port(), mode, out), nprocs=2, join=True)
    from safetensors.torch import load_file
    return load_file(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_whole_batch(mode, tmp_path):
    reference = make_model()
    train(reference, *batch())
    expected = adapter_state(reference)
    got = run_distributed(mode, tmp_path)
    assert set(got) == set(expected)
    for name in expected:
        assert_close(got[name], expected[name], "reloaded factors", name)
    assert any(float(t.abs().max()) > 0 for n, t in expected.items() if n.endswith("lora_B"))


def test_frames_sharded_across_ranks_equal_single_process(tmp_path):
    got = run_distributed("frames", tmp_path)
    torch.manual_seed(3)
    weights = {f"w{i}": torch.randn(16 + i % 2, 24) for i in range(5)}
    taillor.clear_frame_cache()
    frames = taillor.frame.build_frames(weights, taillor.TailLoRConfig(frame="head", head=3))
    for name, frame in frames.items():
        for part in ("U", "S", "V"):
            assert_close(got[f"{name}.{part}"], getattr(frame, part), "other rank", f"{name}.{part}")
    full = taillor.frame.build_frames(weights, ENERGY_CONFIG)
    assert {name: int(got[f"full.{name}.h"]) for name in weights} == {n: f.head_size for n, f in full.items()}
