"""Frames: exactness (full), accuracy contract of head frames with default settings, head sizes, caching, and the
frame modes (factors both ways, the penalty's frame tensors, A's initialisation)."""
from __future__ import annotations

import os

import pytest
import torch

import taillor
from conftest import TOLERANCE, assert_close
from taillor.frame import build_frames, compute_frame, frame_mode, head_uses_exact_svd
from test_randomized_svd import SPECTRA, largest_principal_angle, matrix_with_spectrum


def test_full_frame_is_the_exact_thin_svd():
    W = torch.randn(30, 50, dtype=torch.float64)
    frame = compute_frame(W, taillor.TailLoRConfig(frame="full", head=5), "w")
    assert frame.U.shape == (30, 30) and frame.S.shape == (30,) and frame.V.shape == (50, 30)
    torch.testing.assert_close((frame.U * frame.S) @ frame.V.t(), W)
    assert frame.head_size == 5


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_head_frame_default_settings_meet_the_accuracy_contract(spectrum):
    m, n, h = 300, 260, 24
    W = matrix_with_spectrum(SPECTRA[spectrum](n), m, n, seed=7).float()
    config = taillor.TailLoRConfig(frame="head", head=h)
    assert not head_uses_exact_svd(h, min(m, n), config), "the randomized path (not the exact fallback) is under test"
    frame = compute_frame(W, config, "w")
    U0, S0, V0h = torch.linalg.svd(W.double(), full_matrices=False)
    assert ((frame.S.double() - S0[:h]) / S0[:h]).abs().max() < TOLERANCE["sigma"]
    assert largest_principal_angle(frame.U, U0[:, :h]) < TOLERANCE["angle"]
    assert largest_principal_angle(frame.V, V0h[:h].mT) < TOLERANCE["angle"]


def test_head_from_fraction_and_energy():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    W = matrix_with_spectrum(sigma, 6, 8)
    assert compute_frame(W, taillor.TailLoRConfig(head=0.5), "w").head_size == 3
    # energies 16, 4, 1, 1, .25, .01 of 22.26: 16/22.26 = .719, 20/22.26 = .898, 21/22.26 = .943
    assert compute_frame(W, taillor.TailLoRConfig(head_energy=0.7), "w").head_size == 1
    assert compute_frame(W, taillor.TailLoRConfig(head_energy=0.9), "w").head_size == 3
    assert compute_frame(W, taillor.TailLoRConfig(head_energy=0.9, frame="head"), "w").head_size == 3


def test_full_frame_head_energy_uses_the_frames_own_spectrum(monkeypatch):
    """Full frame + head_energy: one SVD per weight (no separate svdvals), same h as from the exact spectrum."""
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    W = matrix_with_spectrum(sigma, 6, 8)
    taillor.clear_frame_cache()

    def no_svdvals(*args, **kwargs):
        raise AssertionError("svdvals called: the full SVD already has every singular value")
    monkeypatch.setattr(torch.linalg, "svdvals", no_svdvals)
    frame = compute_frame(W, taillor.TailLoRConfig(frame="full", head_energy=0.9), "w")
    assert frame.head_size == 3 and frame.U.shape == (6, 6)
    assert frame.omega2.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    cached = compute_frame(W, taillor.TailLoRConfig(frame="full", head_energy=0.9), "w")  # from the cache, same h
    assert cached.head_size == 3


@pytest.mark.parametrize("head", [6, 7, 0.95])
def test_head_must_leave_a_tail(head):
    with pytest.raises(ValueError, match="w: head="):
        compute_frame(torch.randn(6, 8), taillor.TailLoRConfig(head=head), "w")


def test_energy_that_needs_every_direction_is_rejected():
    W = torch.eye(4) * 1.0
    with pytest.raises(ValueError, match="head_energy"):
        compute_frame(W, taillor.TailLoRConfig(head_energy=0.99), "w")


def test_non_finite_weight_is_rejected_before_any_svd(monkeypatch):
    W = torch.randn(8, 8)
    W[0, 0] = float("inf")
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD ran on a non-finite weight"))
    with pytest.raises(ValueError, match="layer7: the weight has non-finite"):
        compute_frame(W, taillor.TailLoRConfig(head=2), "layer7")


def test_batched_build_equals_one_by_one():
    torch.manual_seed(0)
    weights = {f"l{i}": torch.randn(40, 64) for i in range(3)}
    weights["odd"] = torch.randn(24, 64)
    config = taillor.TailLoRConfig(frame="head", head=4)
    taillor.clear_frame_cache()
    frames = build_frames(weights, config)
    taillor.clear_frame_cache()
    for name, w in weights.items():
        single = compute_frame(w, config, name)
        assert_close(frames[name].S, single.S, "reordered", f"{name}.S")
        assert_close((frames[name].U * frames[name].S) @ frames[name].V.t(), (single.U * single.S) @ single.V.t(),
                     "reordered product", f"{name} U S Vᵀ")


def test_cache_reuses_frames_and_never_a_stale_one(tmp_path, monkeypatch):
    taillor.clear_frame_cache()
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    W = torch.randn(20, 30)
    config = taillor.TailLoRConfig(head=3, frame_cache_dir=str(tmp_path))
    first = compute_frame(W, config, "w")
    second = compute_frame(W.clone(), config, "w")
    assert len(calls) == 1 and torch.equal(first.U, second.U)
    W[0, 0] += 1e-3
    third = compute_frame(W, config, "w")
    assert len(calls) == 2 and not torch.equal(first.S, third.S)
    assert len(os.listdir(tmp_path)) == 2
    taillor.clear_frame_cache()
    from_disk = compute_frame(W, config, "w")
    assert len(calls) == 2 and torch.equal(from_disk.S, third.S)


@pytest.mark.parametrize("frame", ["full", "head"])
def test_a_frame_is_never_the_cached_entry_itself(frame):
    """Changing a frame in place leaves the memory cache alone (frames the cache keeps are copies; the others,
    which nothing else holds, are not copied: that kept a large model's apply peak at its frames, not twice)."""
    taillor.clear_frame_cache()
    W = torch.randn(20, 30)
    config = taillor.TailLoRConfig(frame=frame, head=3)
    first = compute_frame(W, config, "w")
    original = first.U.clone()
    first.U.mul_(2.0)
    second = compute_frame(W, config, "w")  # from the cache
    assert torch.equal(second.U, original)
    second.U.zero_()
    assert torch.equal(compute_frame(W, config, "w").U, original)
    taillor.clear_frame_cache()


def test_full_and_head_frames_share_one_exact_svd(monkeypatch):
    """A head frame cut from the exact SVD reuses a cached full frame's decomposition (any seed or head) and equals
    its top-h triplets; alone, it caches only its own h triplets."""
    taillor.clear_frame_cache()
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    W = torch.randn(20, 30)
    alone = compute_frame(W, taillor.TailLoRConfig(frame="head", head=7), "w")  # no full frame cached yet
    assert len(calls) == 1 and alone.U.shape == (20, 7)
    full = compute_frame(W, taillor.TailLoRConfig(frame="full", head=3), "w")
    assert len(calls) == 2
    heads = [compute_frame(W, taillor.TailLoRConfig(frame="head", head=h, seed=seed), "w")
             for h, seed in ((8, 0), (8, 1), (9, 0))]
    assert len(calls) == 2  # cut from the cached full frame's SVD
    for head in heads:
        h = head.head_size
        assert head.U.shape == (20, h) and torch.equal(head.U, full.U[:, :h]) and torch.equal(head.S, full.S[:h])
    taillor.clear_frame_cache()


def test_frame_cache_size_is_read_when_needed(monkeypatch):
    """TAILLOR_FRAME_CACHE_MB is read whenever the cache grows, not frozen at import: 0 keeps nothing in memory."""
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    W = torch.randn(20, 30)
    config = taillor.TailLoRConfig(head=3)
    taillor.clear_frame_cache()
    monkeypatch.setenv("TAILLOR_FRAME_CACHE_MB", "0")
    compute_frame(W, config, "w")
    compute_frame(W, config, "w")
    assert len(calls) == 2
    monkeypatch.delenv("TAILLOR_FRAME_CACHE_MB")
    compute_frame(W, config, "w")
    compute_frame(W, config, "w")
    assert len(calls) == 3
    monkeypatch.setenv("TAILLOR_FRAME_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="TAILLOR_FRAME_CACHE_MB.*'lots'"):
        compute_frame(W * 2, config, "w")
    taillor.clear_frame_cache()


@pytest.mark.parametrize("frame", ["full", "head"])
def test_frame_mode_turns_factors_into_layer_factors_and_back(frame):
    torch.manual_seed(0)
    layer = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=3, head=4, frame=frame)
    with torch.no_grad():
        layer.lora_B.normal_()
    mode = layer.frame_mode
    assert mode is frame_mode(frame) and mode.name == frame
    P, Q = mode.layer_factors(layer.lora_A, layer.lora_B, layer.frame)
    assert P.shape == (24, 3) and Q.shape == (20, 3)
    A, B = mode.trainable_factors(P, Q, layer.frame)
    assert_close(A, layer.lora_A.detach(), "reordered", "A")
    assert_close(B, layer.lora_B.detach(), "reordered", "B")
    U, V = mode.penalty_frame(layer.frame)
    assert (U is None and V is None) if frame == "full" else (U is layer.frame.U and V is layer.frame.V)
    k = mode.frame_rank(20, 4)
    assert k == (20 if frame == "full" else 4) and layer.frame.rank == k


@pytest.mark.parametrize("frame", ["full", "head"])
def test_tail_init_leaves_no_head_component(frame):
    layer = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=3, head=4, frame=frame, init="tail")
    A = layer.lora_A.detach()
    if frame == "full":
        assert torch.count_nonzero(A[:, :4]) == 0 and torch.count_nonzero(A[:, 4:]) > 0
    else:
        assert_close(A @ layer.frame.V, torch.zeros(3, 4), "exact zero", "A V_h")
    kaiming = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=3, head=4, frame=frame,
                                                init="kaiming")
    other = kaiming.lora_A.detach()
    assert torch.count_nonzero(other[:, :4] if frame == "full" else other @ kaiming.frame.V) > 0
    with pytest.raises(ValueError, match="unknown frame mode 'middle'"):
        frame_mode("middle")
