"""TailLoRLinear forward/backward against the dense float64 oracle, both frames, all dtypes, odd shapes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import taillor
from taillor import functional as F
from conftest import assert_matches_oracle, dense_delta

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


@pytest.mark.parametrize("frame", ["full", "head"])
def test_gradcheck_float64(frame):
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
    k = min(d_in, d_out)
    A = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    Bk = torch.randn(k, r, dtype=torch.float64, requires_grad=True)
    U = torch.linalg.qr(torch.randn(d_out, k, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, dtype=torch.float64)).Q
    assert torch.autograd.gradcheck(lambda A, B: F.spectral_projection(A, B, U, V), (A, Bk))


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
