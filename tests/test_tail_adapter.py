"""The tail adapter op, y = x Wᵀ + b + s·(x_a P) Qᵀ, against the dense float64 oracle.

Layer level: TailLoRLinear forward/backward, both frames, all dtypes, odd shapes, dropout, autocast, gradcheck;
with the Triton backend forced (each route: split, fused, onepass) the layer matches the oracle at least as well as
the eager path.
Launcher level: every implementation on this machine (eager; the Triton routes in the interpreter; compiled on
a GPU, marked ``gpu``) — every output, the schema's empty outputs, zero tokens, strided factors, argument checks.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import taillor
from taillor import functional as F
from conftest import CUDA, DTYPE_ID, DTYPES, KernelImpl, assert_close, assert_matches_oracle, dense_delta, kernel_impls

ROUTES = ["split", "fused", "onepass"]


def adapter_impls(backends=("eager", "interpreter")) -> list:
    """The ``impl`` parameters of the adapter's launchers: conftest's (eager, the split and fused routes) and the
    onepass route of each Triton backend in ``backends``."""
    params = kernel_impls("tail_adapter", backends)
    for backend in backends:
        if backend == "eager":
            continue
        marks = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled Triton kernels)")] \
            if backend == "compiled" else []
        impl = KernelImpl(backend, "onepass")
        params.append(pytest.param(impl, id=impl.id, marks=marks))
    return params


def make_layer(d_in=96, d_out=80, rank=4, frame="full", head=8, bias=True, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    layer = taillor.TailLoRLinear.from_linear(linear, rank=rank, head=head, frame=frame, alpha=2.0 * rank, **kw)
    with torch.no_grad():  # a trained-looking B so that the adapter contributes
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def oracle_forward(layer, x):
    W = layer.base_layer.weight.detach().double() + dense_delta(layer)
    b = layer.base_layer.bias
    return x.double() @ W.t() + (b.detach().double() if b is not None else 0)


@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64_oracle(frame, dtype, bias):
    layer = make_layer(frame=frame, dtype=dtype, bias=bias)
    x = torch.randn(3, 37, 96, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 37, 80)
    assert_matches_oracle(y.detach(), oracle_forward(layer, x.detach()), dtype, "y")

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    y.backward(dy)
    # Oracle gradients: autograd through the dense float64 formula.
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    U, V, s = layer.frame.U.double(), layer.frame.V.double(), layer.scaling
    delta = s * (U @ B @ A @ V.t() if frame == "full" else B @ A)
    W = layer.base_layer.weight.detach().double() + delta
    y64 = x64 @ W.t()
    y64.backward(dy.double())
    assert_matches_oracle(x.grad, x64.grad, dtype, "dx")
    assert_matches_oracle(layer.lora_A.grad, A.grad, dtype, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, dtype, "dB")
    assert layer.base_layer.weight.grad is None


def test_starts_equal_to_base_layer():
    torch.manual_seed(0)
    linear = nn.Linear(50, 30)
    layer = taillor.TailLoRLinear.from_linear(linear, rank=3, head=5)
    x = torch.randn(7, 50)
    assert torch.equal(layer(x), linear(x))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_dropout_goes_only_through_the_adapter():
    layer = make_layer(dropout=0.5)
    x = torch.randn(16, 96)
    layer.eval()
    y_eval = layer(x)
    assert_matches_oracle(y_eval.detach(), oracle_forward(layer, x), torch.float32, "eval")
    layer.train()
    torch.manual_seed(5)
    x.requires_grad_(True)
    y = layer(x)
    # Same mask, computed by hand: base(x) + s·(dropout(x) P) Qᵀ.
    torch.manual_seed(5)
    mask_x = torch.nn.functional.dropout(x.detach(), 0.5, training=True)
    P, Q = (t.detach().double() for t in layer.adapter_factors())
    expected = x.detach().double() @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double() \
        + layer.scaling * (mask_x.double() @ P) @ Q.t()
    assert_matches_oracle(y.detach(), expected, torch.float32, "train")
    y.sum().backward()
    expected_dx = torch.ones(16, 80, dtype=torch.float64) @ layer.base_layer.weight.double() \
        + (mask_x != 0).double() * 2.0 * layer.scaling * (torch.ones(16, 80, dtype=torch.float64) @ Q @ P.t())
    assert_matches_oracle(x.grad, expected_dx, torch.float32, "dx with dropout")


def test_gradcheck_float64():
    torch.manual_seed(0)
    d_in, d_out, r = 11, 7, 2
    x = torch.randn(5, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64)
    P = torch.randn(d_in, r, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, P, Q: F.taillor_linear(x, W, b, P, Q, 1.5), (x, P, Q))
    xa = torch.randn(5, d_in, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, xa, P, Q: F.taillor_linear(x, W, b, P, Q, 0.5, xa), (x, xa, P, Q))
    Wg = W.clone().requires_grad_(True)
    bg = b.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, W, b: F.taillor_linear(x, W, b, P.detach(), Q.detach(), 2.0),
                                    (x, Wg, bg))


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 33), d_out=st.integers(1, 33), tokens=st.integers(1, 9), frame=st.sampled_from(["full", "head"]),
       rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(d_in, d_out, tokens, frame, rank, seed):
    m = min(d_in, d_out)
    assume(m >= 2)  # a head must leave at least one tail direction
    rank = min(rank, m)
    layer = make_layer(d_in=d_in, d_out=d_out, rank=rank, frame=frame, head=1, seed=seed, dtype=torch.float64)
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert_matches_oracle(y.detach(), oracle_forward(layer, x.detach()), torch.float64, "y")
    y.pow(2).sum().backward()
    x64 = x.detach().clone().requires_grad_(True)
    (x64 @ (layer.base_layer.weight.double() + dense_delta(layer)).t() + layer.base_layer.bias.double()) \
        .pow(2).sum().backward()
    assert_matches_oracle(x.grad, x64.grad, torch.float64, "dx")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_eager_backward_token_split_matches_float64_oracle(threads):
    """With several CPU threads the eager backward splits the token reduction of dP, dQ across them."""
    from taillor.eager.tail_adapter import tail_adapter_backward
    g = torch.Generator().manual_seed(7)
    T, d_in, d_out, r, s = 1536, 40, 56, 3, 0.5  # T / threads >= 256 tokens: the split path for 2 and 3 threads
    x, dy = torch.randn(T, d_in, generator=g), torch.randn(T, d_out, generator=g)
    W = torch.randn(d_out, d_in, generator=g)
    P, Q = torch.randn(d_in, r, generator=g), torch.randn(d_out, r, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dx, dP, dQ, _ = tail_adapter_backward(dy, x, W, x @ P, P, Q, s)
    finally:
        torch.set_num_threads(previous)
    x64, dy64, W64, P64, Q64 = (t.double() for t in (x, dy, W, P, Q))
    G = dy64 @ Q64
    assert_matches_oracle(dx, dy64 @ W64 + s * G @ P64.t(), torch.float32, "dx")
    assert_matches_oracle(dP, s * x64.t() @ G, torch.float32, "dP")
    assert_matches_oracle(dQ, s * dy64.t() @ (x64 @ P64), torch.float32, "dQ")


@pytest.mark.parametrize("n", [1, 2, 8, 9, 16, 33])
def test_narrow_matmul_matches_float64_product(n):
    """The CPU operand-order choice of the rank-r products (transposed form up to 8 columns)."""
    from taillor.eager.gemm_forms import narrow_matmul
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(37, 29, generator=g), torch.randn(29, n, generator=g)
    out = narrow_matmul(a, b)
    assert out.shape == (37, n) and out.is_contiguous()
    assert_matches_oracle(out, a.double() @ b.double(), torch.float32, f"N={n}")


@pytest.mark.parametrize("frame", ["full", "head"])
def test_autocast_bf16_matches_float64_oracle(frame):
    """Under torch.autocast (HF Trainer's bf16=True) the layer computes in bf16 and its gradients reach fp32 A, B."""
    layer = make_layer(frame=frame)
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(5), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        penalty = layer.spectral_penalty()
    assert y.dtype == torch.bfloat16 and penalty.dtype == torch.float32
    assert_matches_oracle(y.detach(), oracle_forward(layer, x.detach()), torch.bfloat16, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    y.float().backward(dy)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    U, V, s = layer.frame.U.double(), layer.frame.V.double(), layer.scaling
    delta = s * (U @ B @ A @ V.t() if frame == "full" else B @ A)
    (x64 @ (layer.base_layer.weight.detach().double() + delta).t()).backward(dy.double())
    assert layer.lora_A.grad.dtype == torch.float32
    assert_matches_oracle(x.grad, x64.grad, torch.bfloat16, "dx")
    assert_matches_oracle(layer.lora_A.grad, A.grad, torch.bfloat16, "dA")
    assert_matches_oracle(layer.lora_B.grad, B.grad, torch.bfloat16, "dB")


# ---------------------------------------------------------------------------------------------------------------
# the layer with the Triton backend forced, both routes (interpreter on the CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------------
def run_layer(layer, x, dy, backend, route="split"):
    """{"y", "dx", "dA", "dB"} of one forward/backward of ``layer`` under ``use_backend(backend, adapter=route)``."""
    with taillor.use_backend(backend, adapter=route):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        out = {"y": y.detach(), "dx": x.grad, "dA": layer.lora_A.grad.clone(), "dB": layer.lora_B.grad.clone()}
        layer.zero_grad(set_to_none=True)
    return out


def oracle_outputs(layer, x, dy):
    """The float64 oracle of :func:`run_layer`'s outputs (autograd through the dense formula)."""
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ (layer.base_layer.weight.double() + dense_delta_of(layer, A, B)).t() + layer.base_layer.bias.double()
    y.backward(dy.double())
    return {"y": y.detach(), "dx": x64.grad, "dA": A.grad, "dB": B.grad}


def dense_delta_of(layer, A, B):
    U, V, s = layer.frame.U.double(), layer.frame.V.double(), layer.scaling
    return s * (U @ B @ A @ V.t() if layer.config.frame == "full" else B @ A)


def triton_layer(device, frame, dtype, **options):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80).to(device, dtype)
    layer = taillor.TailLoRLinear.from_linear(linear, rank=4, head=8, frame=frame, penalty=0.3,
                                              head_share_target=None, penalty_weighting="sigma", **options)
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1)) if device == "cpu" else layer.lora_B.normal_()
    return layer


@pytest.mark.gpu  # compiled kernels on a GPU; the Triton interpreter on the CPU
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("frame", ["full", "head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_triton_layer_matches_oracle_as_well_as_eager(triton_layer_device, route, frame, dtype):
    device = triton_layer_device
    layer = triton_layer(device, frame, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 96, generator=g).to(device, dtype)
    dy = torch.randn(37, 80, generator=g).to(device, dtype)
    eager = run_layer(layer, x, dy, "eager")
    triton = run_layer(layer, x, dy, "triton", route)
    for name, expected in oracle_outputs(layer, x, dy).items():
        assert_matches_oracle(triton[name], expected, dtype, name, eager=eager[name])


@pytest.mark.gpu  # compiled kernels on a GPU; the Triton interpreter on the CPU
@pytest.mark.parametrize("route", ROUTES)
def test_triton_layer_dropout_path(triton_layer_device, route):
    device = triton_layer_device
    layer = triton_layer(device, "full", torch.float32, dropout=0.3).train()
    x = torch.randn(21, 96).to(device)
    dy = torch.randn(21, 80).to(device)
    results = []
    for backend in ("eager", "triton"):
        torch.manual_seed(7)  # the same dropout mask for both
        results.append(run_layer(layer, x, dy, backend, route))
    for name in ("y", "dx", "dA", "dB"):
        assert_close(results[1][name], results[0][name], "other backend", name)


# ---------------------------------------------------------------------------------------------------------------
# launchers of every implementation (eager, Triton interpreter, compiled Triton on a GPU)
# ---------------------------------------------------------------------------------------------------------------
def _d(t):
    return None if t is None else t.detach().cpu().double()


def is_empty(t):
    """The op schemas' "not computed" output: an empty 1-D tensor."""
    return t.dim() == 1 and t.numel() == 0


def adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter, device="cpu", strided=False, seed=0):
    """x, W, b, P, Q, x_adapter; with ``strided`` P and Q are transposed views (P = Aᵀ as in head mode)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    x = rnd(T, d_in)
    W = rnd(d_out, d_in, std=d_in ** -0.5)
    b = rnd(d_out) if bias else None
    if strided:
        P, Q = rnd(r, d_in, std=d_in ** -0.5).t(), rnd(r, d_out, std=0.5).t()
    else:
        P, Q = rnd(d_in, r, std=d_in ** -0.5), rnd(d_out, r, std=0.5)
    xa = rnd(T, d_in) if adapter else None
    return x, W, b, P, Q, xa


def check_tail_adapter(forward, backward, T, d_in, d_out, r, dtype, bias, adapter, device="cpu", strided=False):
    """Forward and backward of one implementation against the float64 oracle (every output), each allowed twice
    the error of plain PyTorch products in ``dtype`` plus the floor."""
    s = 0.75
    x, W, b, P, Q, xa = adapter_inputs(T, d_in, d_out, r, dtype, bias, adapter, device, strided)
    xa_ = x if xa is None else xa

    y, S = forward(x, W, b, P, Q, s, xa)
    assert y.dtype == dtype and S.dtype == dtype and y.device == x.device
    S64 = _d(xa_) @ _d(P)
    y64 = _d(x) @ _d(W).T + s * S64 @ _d(Q).T + (0 if b is None else _d(b))
    S_e = xa_ @ P
    y_e = x @ W.T + s * (S_e @ Q.T) + (0 if b is None else b)
    assert_matches_oracle(S, S64, dtype, "S", eager=S_e)
    assert_matches_oracle(y, y64, dtype, "y", eager=y_e)

    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(T, d_out, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    dx, dP, dQ, dxa = backward(dy, x, W, S, P, Q, s, xa, True, True, True)
    G64 = _d(dy) @ _d(Q)
    G_e = dy @ Q
    assert dP.dtype == P.dtype and dQ.dtype == Q.dtype and dx.dtype == dtype
    assert_matches_oracle(dQ, s * _d(dy).T @ _d(S), dtype, "dQ", eager=s * (dy.T @ S))
    assert_matches_oracle(dP, s * _d(xa_).T @ G64, dtype, "dP", eager=s * (xa_.T @ G_e))
    if xa is None:
        assert is_empty(dxa)
        assert_matches_oracle(dx, _d(dy) @ _d(W) + s * G64 @ _d(P).T, dtype, "dx", eager=dy @ W + s * (G_e @ P.T))
    else:
        assert_matches_oracle(dx, _d(dy) @ _d(W), dtype, "dx", eager=dy @ W)
        assert_matches_oracle(dxa, s * G64 @ _d(P).T, dtype, "dx_adapter", eager=s * (G_e @ P.T))


# (T, d_in, d_out, r): odd sizes, rank 1, d_in < 2r, and r above one rank block (64).
ADAPTER_SHAPES = [(37, 96, 80, 4), (5, 40, 24, 1), (19, 6, 10, 4), (9, 20, 18, 70)]


@pytest.mark.parametrize("impl", adapter_impls(("eager", "interpreter")), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,adapter", [(True, False), (False, True), (True, True)],
                         ids=["bias", "x_adapter", "bias+x_adapter"])
def test_launchers_match_float64_oracle(impl, dtype, shape, bias, adapter):
    check_tail_adapter(*impl.launchers("tail_adapter"), *shape, dtype, bias, adapter, impl.device)


# (T, d_in, d_out, r, bias, x_adapter, strided P/Q) on the GPU: odd T, rank 1, zero tokens, dropout input, strided
# factors, r above one rank block, and a layer-sized case with dimensions divisible by 16.
COMPILED_CASES = {
    "odd-T": (37, 96, 80, 4, True, False, False),
    "r=1": (5, 40, 24, 1, False, False, False),
    "T=0": (0, 64, 48, 8, True, False, False),
    "dropout-input": (33, 96, 80, 8, False, True, False),
    "strided-PQ": (13, 48, 40, 3, True, False, True),
    "wide-r": (9, 20, 18, 70, True, True, False),
    "layer": (512, 1024, 768, 16, False, False, False),
}


@pytest.mark.parametrize("impl", adapter_impls(("compiled",)), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_launchers_match_float64_oracle(impl, dtype, case):
    T, d_in, d_out, r, bias, adapter, strided = COMPILED_CASES[case]
    check_tail_adapter(*impl.launchers("tail_adapter"), T, d_in, d_out, r, dtype, bias, adapter, impl.device,
                       strided)


@pytest.mark.parametrize("impl", adapter_impls(("compiled",)), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("index", range(5))
def test_every_tuning_config(impl, dtype, index):
    """Each tuning config of the fused GEMM (5 for 16-bit inputs, 3 for fp32) and of the pair kernel (4)."""
    from taillor._kernels import launch
    with launch.forced_config(index):
        check_tail_adapter(*impl.launchers("tail_adapter"), 300, 512, 384, 16, dtype, True, False, impl.device)


@pytest.mark.parametrize("impl", adapter_impls(("eager", "interpreter")), indirect=True)
@pytest.mark.parametrize("adapter", [False, True])
def test_backward_computes_only_what_is_needed(impl, adapter):
    forward, backward = impl.launchers("tail_adapter")
    x, W, b, P, Q, xa = adapter_inputs(11, 24, 20, 3, torch.float32, False, adapter)
    y, S = forward(x, W, None, P, Q, 0.5, xa)
    dy = torch.randn(11, 20)
    full = backward(dy, x, W, S, P, Q, 0.5, xa)
    for need in ("need_dx", "need_dP", "need_dQ"):
        out = backward(dy, x, W, S, P, Q, 0.5, xa, **{need: False})
        skipped = {"need_dx": (0, 3), "need_dP": (1,), "need_dQ": (2,)}[need]
        for i, (got, ref) in enumerate(zip(out, full, strict=True)):
            if i in skipped or is_empty(ref):
                assert is_empty(got)
            else:
                assert torch.equal(got, ref)
    none = backward(dy, x, W, S, P, Q, 0.5, xa, need_dx=False, need_dP=False, need_dQ=False)
    assert all(is_empty(t) for t in none)


@pytest.mark.parametrize("impl", adapter_impls(("eager", "interpreter")), indirect=True)
def test_zero_tokens(impl):
    forward, backward = impl.launchers("tail_adapter")
    x, W, b, P, Q, _ = adapter_inputs(0, 16, 12, 2, torch.float32, True, False)
    y, S = forward(x, W, b, P, Q, 2.0)
    assert y.shape == (0, 12) and S.shape == (0, 2)
    dx, dP, dQ, dxa = backward(torch.zeros(0, 12), x, W, S, P, Q, 2.0)
    assert dx.shape == (0, 16) and is_empty(dxa)
    assert torch.equal(dP, torch.zeros(16, 2)) and torch.equal(dQ, torch.zeros(12, 2))


@pytest.mark.parametrize("impl", adapter_impls(("eager", "interpreter")), indirect=True)
def test_strided_factors(impl):
    # P and Q may be strided views (head mode passes P = A.t()); x must be row-major.
    check_tail_adapter(*impl.launchers("tail_adapter"), 13, 24, 20, 3, torch.float32, True, False, strided=True)


@pytest.mark.parametrize("impl", adapter_impls(("interpreter",)), indirect=True)
def test_triton_launchers_reject_bad_inputs(impl):
    forward, backward = impl.launchers("tail_adapter")
    x, W, b, P, Q, _ = adapter_inputs(7, 16, 12, 2, torch.float32, True, False)
    s = 1.0
    with pytest.raises(ValueError, match="weight"):
        forward(x, W[:, :15], b, P, Q, s)
    with pytest.raises(ValueError, match="Q"):
        forward(x, W, b, P, Q[:, :1], s)
    with pytest.raises(ValueError, match="P has dtype"):
        forward(x, W, b, P.double(), Q, s)
    with pytest.raises(ValueError, match="bias"):
        forward(x, W, b[:5], P, Q, s)
    with pytest.raises(ValueError, match="x must be contiguous"):
        forward(torch.randn(16, 7).t(), W, b, P, Q, s)
    with pytest.raises(ValueError, match="x_adapter"):
        forward(x, W, b, P, Q, s, x_adapter=x[:3])
    with pytest.raises(ValueError, match="x must be 2-D"):
        forward(x[None], W, b, P, Q, s)
    with pytest.raises(ValueError, match="x has dtype"):
        forward(x.to(torch.int32), W.to(torch.int32), None, P, Q, s)
    y, S = forward(x, W, b, P, Q, s)
    with pytest.raises(ValueError, match="dy"):
        backward(torch.randn(7, 13), x, W, S, P, Q, s)
    with pytest.raises(ValueError, match="S has"):
        backward(torch.randn(7, 12), x, W, S.half(), P, Q, s)


@pytest.mark.parametrize("impl", [p for p in adapter_impls(("interpreter",)) if p.values[0].route == "onepass"],
                         indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("adapter", [False, True])
def test_onepass_partials_over_several_blocks(impl, dtype, adapter):
    """The onepass route's fp32 partials summed over several row chunks, column chunks and dP row blocks (T = 300
    tokens: three 128-row blocks of the dx GEMM; ten row and two column chunks of the dy pass)."""
    check_tail_adapter(*impl.launchers("tail_adapter"), 300, 72, 100, 16, dtype, True, adapter, impl.device)
