"""Custom ops: torch.library.opcheck (schema, fake, autograd registration) and torch.compile with inductor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from taillor import ops
from conftest import assert_matches_oracle


def _adapter_args(requires_grad=True, x_adapter=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g, requires_grad=requires_grad)
    W, b = torch.randn(9, 12, generator=g), torch.randn(9, generator=g)
    P = torch.randn(12, 3, generator=g, requires_grad=requires_grad)
    Q = torch.randn(9, 3, generator=g, requires_grad=requires_grad)
    xa = torch.randn(7, 12, generator=g, requires_grad=requires_grad) if x_adapter else None
    return x, W, b, P, Q, 0.75, xa


@pytest.mark.parametrize("x_adapter", [False, True])
def test_opcheck_tail_adapter(x_adapter):
    torch.library.opcheck(ops.tail_adapter_fwd, _adapter_args(x_adapter=x_adapter))
    x, W, b, P, Q, s, xa = _adapter_args(requires_grad=False, x_adapter=x_adapter)
    y, S = ops.tail_adapter_fwd(x, W, b, P, Q, s, xa)
    torch.library.opcheck(ops.tail_adapter_bwd, (torch.randn_like(y), x, W, S, P, Q, s, xa, True, True, False))


def test_opcheck_projection_and_penalty():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 8, generator=g, requires_grad=True)
    B = torch.randn(8, 3, generator=g, requires_grad=True)
    U, V = torch.linalg.qr(torch.randn(10, 8, generator=g)).Q, torch.linalg.qr(torch.randn(12, 8, generator=g)).Q
    torch.library.opcheck(ops.spectral_projection_fwd, (A, B, U, V))
    torch.library.opcheck(ops.spectral_projection_bwd, (torch.randn(12, 3), None, U, V))
    w = torch.rand(8, generator=g)
    torch.library.opcheck(ops.spectral_penalty_fwd, (A, B, None, None, w, 0.5))
    Ah = torch.randn(3, 12, generator=g, requires_grad=True)
    Bh = torch.randn(10, 3, generator=g, requires_grad=True)
    torch.library.opcheck(ops.spectral_penalty_fwd, (Ah, Bh, U[:, :4], V[:, :4], w[:4], 0.5))
    torch.library.opcheck(ops.randomized_svd_op, (torch.randn(2, 20, 16, generator=g), 4, 1, 4, 0))


@pytest.mark.slow
@pytest.mark.parametrize("frame", ["full", "head"])
def test_torch_compile_inductor_forward_backward(frame):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    taillor.apply_taillor(model, taillor.TailLoRConfig(rank=2, head=2, target_modules=["0", "2"], frame=frame))
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)

    def loss_fn(m, x):
        return m(x).pow(2).sum() + taillor.spectral_penalty(m)

    inputs = [x] + [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, x)
    grads = torch.autograd.grad(loss, inputs)
    compiled = torch.compile(loss_fn, backend="inductor", fullgraph=True)  # backward compiled by AOTAutograd
    loss_c = compiled(model, x)
    grads_c = torch.autograd.grad(loss_c, inputs)
    assert_matches_oracle(loss_c, loss, torch.float32, "loss")
    for a, b in zip(grads, grads_c):
        assert_matches_oracle(b, a, torch.float32, "grad")


def test_backend_selection(monkeypatch):
    from taillor import backends
    monkeypatch.setenv("TAILLOR_BACKEND", "eager")
    assert backends.use_triton(torch.device("cpu")) is False
    monkeypatch.setenv("TAILLOR_BACKEND", "auto")
    assert backends.use_triton(torch.device("cpu")) is False
    monkeypatch.setenv("TAILLOR_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        backends.requested_backend()
    monkeypatch.setenv("TAILLOR_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        taillor.taillor_linear(*_adapter_args()[:6])


def test_info_reports_backends_and_extension():
    data = taillor.info()
    assert data["cuda_extension"] in ("built", "missing")
    assert data["torch"] == torch.__version__ and "triton_kernels" in data and "backends" in data
    from taillor.cli import main
    assert main(["info"]) == 0
