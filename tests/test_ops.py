"""Custom ops: torch.library.opcheck (schema, fake, autograd registration) on the eager and the Triton kernels,
the eager route that skips the dispatcher, tracing, and torch.compile with inductor."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import taillor
from taillor import backends, ops
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
    torch.library.opcheck(ops.spectral_projection_fwd, (A, B, U, V, None))
    torch.library.opcheck(ops.spectral_projection_fwd, (A, B, U, V, torch.bfloat16))
    torch.library.opcheck(ops.spectral_projection_bwd, (torch.randn(12, 3), None, U, V))
    torch.library.opcheck(ops.spectral_projection_bwd, (None, torch.randn(10, 3, dtype=torch.bfloat16), U, V))
    w = torch.rand(8, generator=g)
    torch.library.opcheck(ops.spectral_penalty_fwd, (A, B, None, None, w, 0.5))
    Ah = torch.randn(3, 12, generator=g, requires_grad=True)
    Bh = torch.randn(10, 3, generator=g, requires_grad=True)
    torch.library.opcheck(ops.spectral_penalty_fwd, (Ah, Bh, U[:, :4], V[:, :4], w[:4], 0.5))
    torch.library.opcheck(ops.randomized_svd_op, (torch.randn(2, 20, 16, generator=g), 4, 1, 4, 0))


def _ops_dispatched(fn) -> set[str]:
    """Names of the taillor custom ops that went through the dispatcher while ``fn`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("taillor::")}


@pytest.mark.parametrize("x_adapter", [False, True])
def test_eager_route_equals_dispatcher_route(x_adapter):
    """functional calls the device kernel directly in eager mode; the custom op (with the same registered
    autograd) must give bit-identical outputs and gradients."""
    args = _adapter_args(x_adapter=x_adapter)
    dy = torch.randn(7, 9, generator=torch.Generator().manual_seed(3))
    leaves = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]

    def direct():
        y = taillor.taillor_linear(*args)
        return (y, *torch.autograd.grad(y, leaves, dy))

    def dispatched():
        y = ops.tail_adapter_fwd(*args)[0]
        return (y, *torch.autograd.grad(y, leaves, dy))

    for a, b in zip(direct(), dispatched()):
        assert torch.equal(a, b)
    assert _ops_dispatched(lambda: direct()) == set()
    # The backward is shared, so the dispatched forward's backward also runs its kernel directly.
    assert _ops_dispatched(lambda: dispatched()) == {"taillor::tail_adapter_fwd"}


def test_traced_calls_use_the_ops(monkeypatch):
    """Under a tracing mode (fake tensors here; make_fx, export and compile alike) the public functions go
    through the custom ops and their fake impls, never run a kernel on traced tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def must_not_run(*args):
        raise AssertionError("a device kernel ran under a tracing mode")
    monkeypatch.setattr(ops, "_DEVICE_KERNELS", {op: must_not_run for op in ops._DEVICE_KERNELS})
    real = _adapter_args()
    with FakeTensorMode() as mode:
        x, W, b, P, Q, s, _ = (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in real)
        y = taillor.taillor_linear(x, W, b, P, Q, s)
        dx, dP = torch.autograd.grad(y.sum(), [x, P])
        A, B = torch.randn(3, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
        penalty = taillor.functional.spectral_penalty(A, B, None, None, torch.rand(8), 0.5)
        (dA,) = torch.autograd.grad(penalty, [A])
    assert y.shape == (7, 9) and dx.shape == (7, 12) and dP.shape == (12, 3)
    assert penalty.shape == () and dA.shape == (3, 8)


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


def test_info_reports_backends_and_extension():
    data = taillor.info()
    assert data["cuda_extension"] in ("built", "missing")
    assert data["torch"] == torch.__version__ and "triton_kernels" in data and "backends" in data
    assert data["adapter_route"] in backends.ADAPTER_ROUTES and set(data["ops"]) == set(ops.OPS)
    from taillor.cli import main
    assert main(["info"]) == 0


@pytest.mark.parametrize("route", ["split", "fused"])
def test_opcheck_with_triton_kernels(triton_layer_device, route):
    """The Triton kernels behind the custom ops pass opcheck too (schema, fake, autograd registration)."""
    device = triton_layer_device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=g).to(device).requires_grad_(True)
    W, b = torch.randn(9, 12, generator=g).to(device), torch.randn(9, generator=g).to(device)
    P = torch.randn(12, 3, generator=g).to(device).requires_grad_(True)
    Q = torch.randn(9, 3, generator=g).to(device).requires_grad_(True)
    A = torch.randn(3, 8, generator=g).to(device).requires_grad_(True)
    B = torch.randn(8, 3, generator=g).to(device).requires_grad_(True)
    U = torch.linalg.qr(torch.randn(9, 8, generator=g)).Q.to(device)
    V = torch.linalg.qr(torch.randn(12, 8, generator=g)).Q.to(device)
    w = torch.rand(8, generator=g).to(device)
    with taillor.use_backend("triton", adapter=route):
        torch.library.opcheck(ops.tail_adapter_fwd, (x, W, b, P, Q, 0.5, None))
        torch.library.opcheck(ops.spectral_projection_fwd, (A, B, U, V, None))
        torch.library.opcheck(ops.spectral_penalty_fwd, (A, B, None, None, w, 0.5))
