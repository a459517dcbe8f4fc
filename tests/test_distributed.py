"""Many processes on the CPU (gloo, 2 ranks): DDP, FSDP2 and `accelerate launch` train exactly like one process on
the whole batch, with both frames, through two tasks with a consolidation; on the FSDP2-sharded model consolidate,
save_adapter, load_adapter and export_lora need no manual gather and write what one process writes; build_frames
really splits the SVDs across ranks and gives every rank every frame.

No test can hang: process groups rendezvous through a file in the test's temp dir (no port), every collective has a
timeout, and every group of processes is joined against a deadline and killed when it passes. The workers of the
in-process tests run in one group (one start-up cost), each scenario writing its own results."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import taillor
from conftest import assert_close
from distributed_flow import BATCH, FRAMES, config, factors, make_model, train_tasks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORLD = 2
# A collective that waits longer than this raises in the worker; a group that runs longer is killed. Both are far
# above the measured times (see the module's --durations) on a loaded 2-core machine.
COLLECTIVE_TIMEOUT_S = 120
GROUP_TIMEOUT_S = 420


# ---------------------------------------------------------------------------------------------------------------
# running a group of processes, bounded
# ---------------------------------------------------------------------------------------------------------------
def _entry(fn, rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rendezvous"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, out)
    except BaseException:
        with open(os.path.join(out, f"error-rank{rank}.txt"), "w", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_group(fn, out: str, world: int = WORLD, timeout: float = GROUP_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, out)`` in ``world`` spawned processes joined in one gloo group (a file rendezvous in
    ``out``). Fails the test, after killing every process still alive, as soon as one exits with an error or when
    ``timeout`` seconds have passed."""
    context = mp.get_context("spawn")
    procs = [context.Process(target=_entry, args=(fn, rank, world, out), daemon=True) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline, problem = time.monotonic() + timeout, None
    while problem is None:
        codes = [proc.exitcode for proc in procs]
        if all(code == 0 for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            problem = f"a worker failed (exit codes {codes})"
        elif time.monotonic() > deadline:
            problem = f"the group ran past its {timeout} s timeout and was killed"
        else:
            time.sleep(0.1)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
    errors = [open(os.path.join(out, name), encoding="utf-8").read() for name in sorted(os.listdir(out))
              if name.startswith("error-rank")]
    pytest.fail(problem + "\n" + "\n".join(errors))


# ---------------------------------------------------------------------------------------------------------------
# what the workers do (every rank runs every scenario, in this order)
# ---------------------------------------------------------------------------------------------------------------
def frame_weights(seed: int) -> dict[str, torch.Tensor]:
    """Five weights in two shapes (so that a rank's share is batched): small enough for the exact SVD."""
    torch.manual_seed(seed)
    return {f"w{i}": torch.randn(16 + i % 2, 24) for i in range(5)}


HEAD_FRAMES = taillor.TailLoRConfig(frame="head", head=3)
ENERGY_FRAMES = taillor.TailLoRConfig(frame="full", head_energy=0.5)


def _frames_scenario(rank: int, out: str) -> None:
    """Build head and full frames with every call of torch.linalg.svd recorded (what this rank decomposed), and
    keep the frames every rank ends with."""
    decomposed, original = [], torch.linalg.svd

    def recording_svd(A, *args, **kwargs):
        decomposed.append(A.detach().clone())
        return original(A, *args, **kwargs)

    torch.linalg.svd = recording_svd
    try:
        taillor.clear_frame_cache()
        head = taillor.frame.build_frames(frame_weights(3), HEAD_FRAMES)
        full = taillor.frame.build_frames(frame_weights(4), ENERGY_FRAMES)
    finally:
        torch.linalg.svd = original
    state = {f"head.{n}.{part}": getattr(f, part).clone() for n, f in head.items() for part in ("U", "S", "V")}
    state.update({f"full.{n}.{part}": getattr(f, part).clone() for n, f in full.items() for part in ("U", "S", "V")})
    state.update({f"full.{n}.h": torch.tensor(f.head_size) for n, f in full.items()})
    state.update({f"svd.{i}": A.contiguous() for i, A in enumerate(decomposed)})
    save_file(state, os.path.join(out, f"frames-rank{rank}.safetensors"))


# FSDP2 layouts: each TailLoR layer its own group plus the root, or the root alone (then A and B stay unsharded
# after a forward without backward, until taillor reshards them).
LAYOUTS = {"per-layer": True, "root": False}
FSDP_CASES = [("full", "per-layer"), ("head", "per-layer"), ("full", "root")]


def _shard(model: nn.Module, layout: str) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    if LAYOUTS[layout]:
        for layer in model:
            if isinstance(layer, taillor.TailLoRLinear):
                fully_shard(layer)
    fully_shard(model)
    return model


def _ddp_scenario(rank: int, world: int, out: str, frame: str) -> None:
    model = make_model(frame)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = train_tasks(model, nn.parallel.DistributedDataParallel(model), rows)
    if rank == 0:  # the usual DDP pattern: one rank saves; nothing collective is involved
        save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(out, f"ddp-{frame}.safetensors"))
        taillor.save_adapter(model, os.path.join(out, f"ddp-{frame}-adapter"))


def _fsdp_scenario(rank: int, world: int, out: str, frame: str, layout: str) -> None:
    """Train and consolidate sharded, then every whole-model operation on the sharded model, with no gather by hand:
    save_adapter and export_lora (every rank calls, rank 0 writes), layer.merge/unmerge, the refusal of
    merge_and_unload, and load_adapter onto a freshly sharded model."""
    model = _shard(make_model(frame), layout)
    tag = f"fsdp-{layout}-{frame}"
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = train_tasks(model, model, rows)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(5))
    layers = [layer for layer in model if isinstance(layer, taillor.TailLoRLinear)]
    # Each model-level call follows a forward without backward: with the root alone, FSDP2 then still holds plain
    # unsharded copies of A, B and W, which taillor must not mistake for the parameters.
    with torch.no_grad():
        results["output.before"] = model(x)
        try:
            taillor.merge_and_unload(model)
            raise AssertionError("merge_and_unload accepted a sharded model")
        except TypeError as error:
            assert "sharded" in str(error), error
        results["output.after refusal"] = model(x)
        taillor.save_adapter(model, os.path.join(out, f"{tag}-adapter"))
        model(x)
        taillor.export_lora(model, os.path.join(out, f"{tag}-lora"))
        # The layer's own merge / unmerge work sharded too; they need the parameters in their sharded state (a
        # layer that is its own FSDP2 unit reshards itself; with the root alone, reshard the root first).
        for layer in layers:
            layer.merge()
        results["output.merged"] = model(x)
        model.reshard()
        for layer in layers:
            layer.unmerge()
        model.reshard()  # what the shards hold, not an unsharded copy
        results["output.unmerged"] = model(x)
        fresh = _shard(make_model(frame), layout)
        fresh(x)
        taillor.load_adapter(fresh, os.path.join(out, f"{tag}-adapter"))
        results["output.reloaded"] = fresh(x)
    results.update({f"reloaded.{name}": t for name, t in factors(fresh).items()})
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, os.path.join(out, f"{tag}.safetensors"))


def _all_scenarios(rank: int, world: int, out: str) -> None:
    _frames_scenario(rank, out)
    for frame in FRAMES:
        _ddp_scenario(rank, world, out, frame)
    for frame, layout in FSDP_CASES:
        _fsdp_scenario(rank, world, out, frame, layout)


@pytest.fixture(scope="module")
def group_out(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("distributed"))
    run_group(_all_scenarios, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the single-process reference
# ---------------------------------------------------------------------------------------------------------------
def reference(frame: str, directory) -> dict[str, torch.Tensor]:
    """The flow in one process on the whole batch; saves its adapter and exported LoRA under ``directory``."""
    model = make_model(frame)
    results = train_tasks(model, model, slice(None))
    taillor.save_adapter(model, os.path.join(directory, "adapter"))
    taillor.export_lora(model, os.path.join(directory, "lora"))
    return results


def assert_same_training(got: dict, expected: dict, what: str) -> None:
    names = [n for n in expected if n.startswith(("output.task", "factor."))]
    assert {n for n in got if n.startswith(("output.task", "factor."))} == set(names), what
    for name in names:
        kind = "reordered" if name.startswith("output") else "reloaded factors"
        assert_close(got[name], expected[name], kind, f"{what}: {name}")
    # The comparison means something: every task moved the outputs, and B left zero.
    assert not torch.equal(expected["output.task0"], expected["output.task1"])
    assert any(float(t.abs().max()) > 0 for n, t in expected.items() if n.endswith("lora_B"))


def assert_same_adapter(got_dir: str, expected_dir: str, what: str) -> None:
    """Every saved tensor and every number of the saved config of two adapter (or exported LoRA) folders."""
    got, expected = load_file(os.path.join(got_dir, "adapter_model.safetensors")), \
        load_file(os.path.join(expected_dir, "adapter_model.safetensors"))
    assert set(got) == set(expected), what
    for name in expected:
        assert_close(got[name], expected[name], "reloaded factors", f"{what}: {name}")
    with open(os.path.join(got_dir, "adapter_config.json"), encoding="utf-8") as handle:
        got_config = json.load(handle)
    with open(os.path.join(expected_dir, "adapter_config.json"), encoding="utf-8") as handle:
        expected_config = json.load(handle)
    # The digest of each folder's own weights file: the tensors were compared above, within rounding.
    for document in (got_config, expected_config):
        assert len(document.pop("weights_sha256", "")) == (64 if "layers" in expected_config else 0), what
    _assert_same_document(got_config, expected_config, what)


def _assert_same_document(got, expected, what: str) -> None:
    if isinstance(expected, dict):
        assert set(got) == set(expected), what
        for key in expected:
            _assert_same_document(got[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, float):  # norms and λ: float32 sums in another order
        assert_close(torch.tensor(got), torch.tensor(expected), "reordered", what)
    else:
        assert got == expected, what


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame", FRAMES)
def test_ddp_two_processes_train_like_one_process(group_out, frame, tmp_path):
    expected = reference(frame, tmp_path)
    got = load_file(os.path.join(group_out, f"ddp-{frame}.safetensors"))
    assert_same_training(got, expected, f"DDP, {frame} frame")
    assert_same_adapter(os.path.join(group_out, f"ddp-{frame}-adapter"), str(tmp_path / "adapter"), "adapter")


@pytest.mark.parametrize("frame, layout", FSDP_CASES)
def test_fsdp2_trains_consolidates_and_saves_like_one_process(group_out, frame, layout, tmp_path):
    expected = reference(frame, tmp_path)
    tag = os.path.join(group_out, f"fsdp-{layout}-{frame}")
    assert_same_training(load_file(tag + ".safetensors"), expected, f"FSDP2 {layout}, {frame} frame")
    # save_adapter and export_lora on the sharded model write what one process writes.
    assert_same_adapter(tag + "-adapter", str(tmp_path / "adapter"), "adapter")
    assert_same_adapter(tag + "-lora", str(tmp_path / "lora"), "exported LoRA")
    # No stray temporary files next to what rank 0 wrote.
    for folder in ("adapter", "lora"):
        listing = sorted(os.listdir(f"{tag}-{folder}"))
        assert listing == ["adapter_config.json", "adapter_model.safetensors"], listing


@pytest.mark.parametrize("frame, layout", FSDP_CASES)
def test_fsdp2_merge_and_load_on_the_sharded_model(group_out, frame, layout):
    got = load_file(os.path.join(group_out, f"fsdp-{layout}-{frame}.safetensors"))
    before = got["output.before"]
    # merge_and_unload refused (TypeError, checked in the worker) and changed nothing.
    assert torch.equal(got["output.after refusal"], before)
    assert_close(got["output.merged"], before, "reordered", "layer.merge() on the sharded model")
    assert_close(got["output.unmerged"], before, "reordered", "layer.unmerge() on the sharded model")
    # load_adapter onto a freshly sharded model: each rank set its shards of A and B.
    assert_close(got["output.reloaded"], before, "reloaded", "load_adapter onto a sharded model")
    for name in (n for n in got if n.startswith("factor.")):
        assert_close(got["reloaded." + name[len("factor."):]], got[name], "reloaded factors", name)


def _decomposed_weights(path: str, weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of ``weights`` whose SVD the rank that wrote ``path`` computed (as recorded, batched or not,
    possibly transposed)."""
    found = []
    for name, A in load_file(path).items():
        if name.startswith("svd."):
            for member in A.reshape(-1, *A.shape[-2:]):
                found += [w for w, W in weights.items() if torch.equal(member, W) or torch.equal(member, W.t())]
    return found


def test_build_frames_splits_the_svds_across_ranks_and_gives_every_rank_every_frame(group_out):
    taillor.clear_frame_cache()
    for tag, weights, cfg in (("head", frame_weights(3), HEAD_FRAMES), ("full", frame_weights(4), ENERGY_FRAMES)):
        by_rank = [_decomposed_weights(os.path.join(group_out, f"frames-rank{r}.safetensors"), weights)
                   for r in range(WORLD)]
        # Each weight was decomposed exactly once, and both ranks took a share.
        assert sorted(sum(by_rank, [])) == sorted(weights), (tag, by_rank)
        assert all(by_rank), (tag, by_rank)
        expected = taillor.frame.build_frames(weights, cfg)
        for r in range(WORLD):
            got = load_file(os.path.join(group_out, f"frames-rank{r}.safetensors"))
            for name, frame in expected.items():
                for part in ("U", "S", "V"):
                    assert_close(got[f"{tag}.{name}.{part}"], getattr(frame, part), "other rank",
                                 f"rank {r}: {tag}.{name}.{part}")
                if tag == "full":  # h from each frame's own spectrum, also on the ranks that received it
                    assert int(got[f"full.{name}.h"]) == frame.head_size


def test_apply_taillor_refuses_a_sharded_model(tmp_path):
    """apply_taillor on a model already sharded: a typed error before any change (one process, world size 1)."""
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method="file://" + str(tmp_path / "rendezvous"), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        torch.manual_seed(0)
        model = fully_shard(nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 7)))
        before = [p.full_tensor().clone() for p in model.parameters()]
        with pytest.raises(TypeError, match="already sharded"):
            taillor.apply_taillor(model, config("full"), progress=False)
        assert not list(taillor.model.iter_taillor_layers(model))
        assert all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# accelerate launch
# ---------------------------------------------------------------------------------------------------------------
def test_accelerate_launch_two_cpu_processes_train_like_one_process(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (it comes with peft, in the dev extra)")
    out = tmp_path / "out"
    out.mkdir()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_accelerate_script.py")
    # PET_STANDALONE: torchrun's own rendezvous binds a free port itself and holds it (no port race); HF_HOME: no
    # accelerate config file of this machine is read.
    env = dict(os.environ, PET_STANDALONE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=GROUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun's agent then stops its workers (they run in sessions of their own), then SIGKILL.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"accelerate launch ran past {GROUP_TIMEOUT_S} s and was killed:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    for frame in FRAMES:
        expected = reference(frame, tmp_path / frame)
        assert_same_training(load_file(str(out / f"{frame}.safetensors")), expected, f"accelerate, {frame} frame")
        assert_same_adapter(str(out / f"{frame}-adapter"), str(tmp_path / frame / "adapter"), "adapter")
