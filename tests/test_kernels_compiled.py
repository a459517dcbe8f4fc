"""Compiled Triton kernels on a CUDA device against the float64 oracle (marked `gpu`; run by
benchmarks/gpu_check.sh). Every Triton op, both adapter routes, fp32/fp16/bf16, rank 1, odd and zero token
counts, a dropout input (x_adapter), strided P/Q, split-K, and every tuning config of the two main kernels.

The same checks as the interpreter tests (tests/kernel_checks.py), but never under the interpreter: the
``compiled`` fixture removes TRITON_INTERPRET for each test (taillor reads it at every launch). Without CUDA every
test here skips with that reason. Tuning is off (TAILLOR_AUTOTUNE=0: the first config runs) so the module spends
its time compiling and checking, not benchmarking configs; ``test_every_config`` runs each config explicitly.
"""
import pytest
import torch

from kernel_checks import DTYPES, ID, assert_close, check_spectral_penalty, check_spectral_projection, check_tail_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled Triton kernels)")]

K = pytest.importorskip("taillor._kernels")
launch = pytest.importorskip("taillor._kernels.launch")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TAILLOR_AUTOTUNE", "0")


ROUTES = {"fused": (K.tail_adapter_forward, K.tail_adapter_backward),
          "split": (K.tail_adapter_split_forward, K.tail_adapter_split_backward)}
# (T, d_in, d_out, r, bias, x_adapter, strided P/Q): odd T, rank 1, zero tokens, dropout input, strided factors,
# r above one rank block, and a layer-sized case with dimensions divisible by 16.
ADAPTER_CASES = {
    "odd-T": (37, 96, 80, 4, True, False, False),
    "r=1": (5, 40, 24, 1, False, False, False),
    "T=0": (0, 64, 48, 8, True, False, False),
    "dropout-input": (33, 96, 80, 8, False, True, False),
    "strided-PQ": (13, 48, 40, 3, True, False, True),
    "wide-r": (9, 20, 18, 70, True, True, False),
    "layer": (512, 1024, 768, 16, False, False, False),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_tail_adapter(route, dtype, case):
    T, d_in, d_out, r, bias, adapter, strided = ADAPTER_CASES[case]
    check_tail_adapter(*ROUTES[route], T, d_in, d_out, r, dtype, bias, adapter, CUDA, strided)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", [(50, 96, 80, 4), (7, 9, 12, 1), (24, 30, 20, 70), (1024, 1024, 768, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_spectral_projection(dtype, shape):
    check_spectral_projection(K.spectral_projection_forward, K.spectral_projection_backward, *shape, dtype, CUDA)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=ID.get)
def test_spectral_projection_in_activation_dtype(out_dtype):
    check_spectral_projection(K.spectral_projection_forward, K.spectral_projection_backward, 1024, 1024, 768, 16,
                              torch.float32, CUDA, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("r", [1, 5, 40])
def test_spectral_penalty(dtype, mode, r):
    check_spectral_penalty(K.spectral_penalty_forward, K.spectral_penalty_backward, mode, r, dtype, CUDA)


@pytest.mark.parametrize("split", [None, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
def test_token_reductions_split_k(split, dtype):
    """dQ = s·dyᵀ S and dP-like reductions over 4099 tokens with the automatic or a forced split-K."""
    g = torch.Generator().manual_seed(4)
    T, d, r = 4099, 256, 16
    dy, S, Q = (torch.randn(*sh, generator=g).to(CUDA, dtype) for sh in ((T, d), (T, r), (d, r)))
    G = torch.empty(T, r, device=CUDA, dtype=dtype)
    dQ = torch.empty(d, r, device=CUDA, dtype=dtype)
    Term = K.pair_gemm.Term
    K.pair_gemm.launch_pair(G, [Term(dy, Q)], 1.0, dQ, [Term(dy.t(), S)], 0.5, split_k=split)
    dy64, S64, Q64 = (t.double().cpu() for t in (dy, S, Q))
    assert_close("G", G, dy @ Q, dy64 @ Q64, dtype)
    assert_close("dQ", dQ, 0.5 * (dy.t() @ S), 0.5 * dy64.t() @ S64, dtype)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ID.get)
@pytest.mark.parametrize("index", range(5))
def test_every_config(route, dtype, index):
    """Each tuning config of the fused GEMM (5 for 16-bit inputs, 3 for fp32) and of the pair kernel (4)."""
    with launch.forced_config(index):
        check_tail_adapter(*ROUTES[route], 300, 512, 384, 16, dtype, True, False, CUDA)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (the device guard)")
def test_launch_follows_the_tensors_device():
    """The device guard: a launch on tensors of the second GPU works while the current device is the first."""
    device = torch.device(CUDA, torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        check_spectral_projection(K.spectral_projection_forward, K.spectral_projection_backward, 50, 96, 80, 4,
                                  torch.float32, device)


def test_tuning_reuses_one_entry_per_bucket(monkeypatch):
    """On the GPU: tuning on, 3000 then 4000 tokens tune the fused GEMM once (one bucket)."""
    monkeypatch.setenv("TAILLOR_AUTOTUNE", "1")
    monkeypatch.setattr(launch, "TUNER", launch.Tuner())
    x3, W, b, P, Q, _ = (t.to(CUDA, torch.bfloat16) if isinstance(t, torch.Tensor) else t
                         for t in _inputs(3000))
    K.tail_adapter_forward(x3, W, b, P, Q, 2.0)
    timed = launch.TUNER.benchmarks
    assert timed > 0
    x4 = torch.randn(4000, 512, device=CUDA, dtype=torch.bfloat16)
    K.tail_adapter_forward(x4, W, b, P, Q, 2.0)
    assert launch.TUNER.benchmarks == timed


def _inputs(T):
    from kernel_checks import adapter_inputs
    return adapter_inputs(T, 512, 384, 16, torch.float32, True, False)
