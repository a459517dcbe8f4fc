"""The demos' peers are set up as their papers define them: PiSSA's adapter holds the top-r SVD part of W and the
base the residual, MiCA's B the bottom-r left singular vectors, OSF freezes the top of the spectrum (a share that
grows per task) and moves only orthogonally to it, O-LoRA's loss and gradient match a float64 oracle, and a merge
and restart never changes what the model computes. Tiny models, CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TOLERANCE, assert_close, assert_matches_oracle

pytest.importorskip("peft", reason="the peers are PEFT methods")

from taillor.demo.peers import (OLORA_LAMBDA_ORTH, PEERS, Peer, lora_down_projections,  # noqa: E402
                                olora_orthogonality, osf_preserved_fraction)

SHAPES = {"up": (24, 16), "down": (16, 24)}  # (d_out, d_in): both orientations of a non-square weight
RANK, ALPHA = 4, 8.0


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.up, self.down = nn.Linear(16, 24, bias=False), nn.Linear(24, 16, bias=False)
        with torch.no_grad():
            for name, (d_out, d_in) in SHAPES.items():
                # a well separated spectrum (4 ... 1), so that float32 SVDs pin every singular subspace down
                q1, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))
                q2, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64))
                k = min(d_out, d_in)
                w = q1[:, :k] @ torch.diag(torch.linspace(4, 1, k, dtype=torch.float64)) @ q2[:, :k].t()
                getattr(self, name).weight.copy_(w)
        self.to(dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _svd64(w):
    return torch.linalg.svd(w.detach().double(), full_matrices=False)


def _layer(net, name):
    return next(m for n, m in net.named_modules() if n.endswith(name) and hasattr(m, "base_layer"))


def _peer(name, model=None, n_tasks=2):
    return Peer(name, model if model is not None else Tiny(), rank=RANK, alpha=ALPHA, targets=["up", "down"],
                n_tasks=n_tasks, seed=0)


def test_pissa_adapter_is_the_top_r_part_and_the_base_keeps_the_residual():
    model = Tiny()
    original = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
    peer = _peer("pissa-merged", model)
    for name in SHAPES:
        layer = _layer(peer.net, name)
        U, S, Vh = _svd64(original[name])
        top = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        adapter = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert_matches_oracle(adapter, top, torch.float32, f"{name}: scaling · B A = top-r SVD part")
        assert_matches_oracle(layer.base_layer.weight, original[name].double() - top, torch.float32,
                              f"{name}: base = W − top-r")
        assert_matches_oracle(layer.base_layer.weight + adapter, original[name].double(), torch.float32,
                              f"{name}: base + adapter = W")


def test_mica_freezes_b_on_the_bottom_r_left_singular_vectors_and_starts_at_zero():
    model = Tiny()
    original = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
    peer = _peer("mica-merged", model)
    for name in SHAPES:
        layer = _layer(peer.net, name)
        U, _, _ = _svd64(original[name])
        B = layer.lora_B["default"].weight
        bottom = U[:, -RANK:]
        assert_matches_oracle(B @ B.t(), bottom @ bottom.t(), torch.float32, f"{name}: span B = bottom-r")
        assert not B.requires_grad and layer.lora_A["default"].weight.requires_grad
        assert torch.count_nonzero(layer.lora_A["default"].weight) == 0
        assert torch.equal(layer.base_layer.weight, original[name])  # MiCA leaves the base weight as it is


def test_osf_preserved_share_grows_per_task():
    assert [osf_preserved_fraction(t, 3) for t in range(3)] == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="osf"):
        osf_preserved_fraction(2, 2)
    peer = _peer("osf", n_tasks=2)
    ranks = [{n: _layer(peer.net, n).effective_rank["default"] for n in SHAPES}]
    peer.end_task()
    ranks.append({n: _layer(peer.net, n).effective_rank["default"] for n in SHAPES})
    assert ranks == [{"up": 16 // 3, "down": 16 // 3}, {"up": 2 * 16 // 3, "down": 2 * 16 // 3}]


def test_osf_freezes_the_top_of_the_spectrum_and_moves_orthogonally_to_it():
    model = Tiny()
    original = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
    peer = _peer("osf", model, n_tasks=1)
    k = int(16 * osf_preserved_fraction(0, 1))
    tops = {}
    for name in SHAPES:
        layer = _layer(peer.net, name)
        U, S, Vh = _svd64(original[name])
        tops[name] = (U[:, :k], Vh[:k])
        low = (layer._osf_U_low_init["default"] * layer._osf_S_low_init["default"]) @ layer._osf_V_low_init["default"]
        assert_matches_oracle(low, original[name].double() - U[:, :k] @ torch.diag(S[:k]) @ Vh[:k],
                              torch.float32, f"{name}: the trainable part is W minus its top-{k} part")
    # PEFT projects each gradient off the preserved subspace, so plain gradient steps stay orthogonal to it (an
    # optimizer that rescales coordinates, as Adam does, leaves the projected direction)
    opt = torch.optim.SGD([p for p in peer.net.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        peer.net(x).pow(2).mean().backward()
        opt.step()
    merged = peer.end_task()
    for name in SHAPES:
        delta = getattr(merged, name).weight.detach().double() - original[name].double()
        u_top, vh_top = tops[name]
        scale = float(delta.abs().max())
        assert scale > 1e-4  # it did move
        for what, part in (("U_topᵀ ΔW", u_top.t() @ delta), ("ΔW V_top", delta @ vh_top.t())):
            err = float(part.abs().max()) / scale  # normalized by the update, the oracle's own scale
            assert err <= TOLERANCE["oracle"][torch.float32], f"{name}: {what} / max|ΔW| = {err:.2e}"


def test_olora_orthogonality_loss_and_gradient_match_float64_oracle():
    peer = _peer("o-lora", Tiny(torch.float64), n_tasks=3)
    assert peer.regularizer() is None  # the first task: nothing to be orthogonal to
    gen = torch.Generator().manual_seed(2)
    earlier = []
    for _ in range(2):  # two finished tasks, each with its own (trained) A
        with torch.no_grad():
            for a in lora_down_projections(peer.net).values():
                a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float64))
        earlier.append({n: a.detach().clone() for n, a in lora_down_projections(peer.net).items()})
        peer.end_task()
    current = lora_down_projections(peer.net)
    assert set(current) == {"up", "down"} and all(len(peer.previous[n]) == 2 for n in current)
    loss = peer.regularizer()
    loss.backward()

    oracle, grads = torch.zeros((), dtype=torch.float64), {}
    for name, a_t in current.items():
        a_t = a_t.detach()
        grads[name] = torch.zeros_like(a_t)
        for task in earlier:
            a_i = task[name]
            for j in range(a_i.shape[0]):  # Σ_{j,k} (A_i A_tᵀ)_{jk}², element by element
                for k in range(a_t.shape[0]):
                    o = sum(a_i[j, m] * a_t[k, m] for m in range(a_t.shape[1]))
                    oracle = oracle + o ** 2
                    grads[name][k] += 2 * o * a_i[j]  # ∂ o² / ∂ A_t[k, :]
        grads[name] *= OLORA_LAMBDA_ORTH
    assert_matches_oracle(loss.detach().reshape(1), (OLORA_LAMBDA_ORTH * oracle).reshape(1), torch.float64,
                          "O-LoRA loss")
    for name, a_t in current.items():
        assert_matches_oracle(a_t.grad, grads[name], torch.float64, f"{name}: ∂ loss / ∂ A_t")
    assert olora_orthogonality([], current["up"]).item() == 0.0


@pytest.mark.parametrize("name", PEERS)
def test_merge_and_restart_keeps_the_model_unchanged(name):
    peer = _peer(name, n_tasks=3)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    for task in range(3):
        with torch.no_grad():  # "training": every trainable factor moves
            for p in peer.net.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            before = peer.net(x)
        net = peer.end_task()
        with torch.no_grad():
            after = net(x)
        assert_close(after, before, "reordered", f"{name}: after task {task + 1}")
        if task < 2:  # a fresh adapter of the next task
            assert any(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in peer.net.parameters())  # merged for good after the last task


def test_unknown_peer_is_rejected():
    with pytest.raises(ValueError, match="unknown peer 'lora'"):
        _peer("lora")


def test_olora_loss_enters_the_trainer_once_per_optimizer_step(tmp_path):
    import copy

    transformers = pytest.importorskip("transformers")
    from test_hf_trainer_causal import EOS, Blocks, examples, tiny_llama

    from taillor.demo.peers import regularized_trainer_class
    from taillor.hf_trainer import CausalLMCollator

    peer = Peer("o-lora", tiny_llama(), rank=2, alpha=4.0, targets=["q_proj", "down_proj"], n_tasks=2, seed=0,
                task_type="CAUSAL_LM")
    with torch.no_grad():  # a finished first task with its own A
        for a in lora_down_projections(peer.net).values():
            a.normal_(generator=torch.Generator().manual_seed(5))
    peer.end_task()

    def one_step(cls, p, out):
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
        trainer = cls(model=p.net, args=args, train_dataset=Blocks(examples()), data_collator=CausalLMCollator(EOS))
        trainer.regularizer = p.regularizer
        trainer.train()
        return {n: a.detach().clone() for n, a in lora_down_projections(p.net).items()}

    start = copy.deepcopy(peer)
    loss = start.regularizer()
    loss.backward()
    with_loss = one_step(regularized_trainer_class(), copy.deepcopy(peer), tmp_path / "a")
    task_only = one_step(transformers.Trainer, copy.deepcopy(peer), tmp_path / "b")
    for name, a in lora_down_projections(start.net).items():
        assert float(a.grad.abs().max()) > 1e-3
        assert_close(with_loss[name] - task_only[name], -0.1 * a.grad, "optimizer step", name)


def test_every_llm_method_has_a_learning_rate_grid_of_the_same_size():
    from taillor.demo.llm import QUICK
    from taillor.demo.llm_grid import choose, grid_settings
    from taillor.demo.llm_methods import LR_GRIDS, METHODS

    assert set(LR_GRIDS) == set(METHODS) - {"frozen"} and {len(g) for g in LR_GRIDS.values()} == {3}
    assert set(PEERS) <= set(METHODS) and "osf" not in QUICK.methods  # --quick keeps the default set
    assert dict(grid_settings(QUICK, "osf", 1e-4).peer_lrs)["osf"] == 1e-4
    assert grid_settings(QUICK, "full-ft", 1e-5).lr_full == 1e-5 and grid_settings(QUICK, "lora-merged", 7e-3).lr == 7e-3
    with pytest.raises(ValueError, match="frozen"):
        grid_settings(QUICK, "frozen", 1e-3)
    rows = [{"method": "osf", "lr": lr, "final_mean_nll": nll} for lr, nll in ((1e-5, 4.1), (3e-5, 3.9), (1e-4, 4.0))]
    assert choose(rows) == {"osf": 3e-5}
