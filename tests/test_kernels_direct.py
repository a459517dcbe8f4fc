"""Direct tests of the Triton launchers (kernels/), run on the CPU by the Triton interpreter.

The interpreter is switched on per test by the ``interpreter`` fixture (tests/conftest.py); taillor reads it at
every launch. Every output is compared with a dense float64 oracle (tests/kernel_checks.py, shared with the
compiled-kernel tests in test_kernels_compiled.py). Also here: the launchers' argument checks, the schema's empty
outputs, split-K, bucketed tuning keys and the tuning cache (all without a GPU).
"""
import pytest
import torch

from kernel_checks import (DTYPES, ID, adapter_inputs, assert_close, check_spectral_penalty,
                           check_spectral_projection, check_tail_adapter, is_empty, penalty_eager,
                           penalty_grads_eager, penalty_inputs)

K = pytest.importorskip("taillor._kernels")
launch = pytest.importorskip("taillor._kernels.launch")

pytestmark = pytest.mark.usefixtures("interpreter")

ROUTES = {"fused": (K.tail_adapter_forward, K.tail_adapter_backward),
          "split": (K.tail_adapter_split_forward, K.tail_adapter_split_backward)}

# ---------------------------------------------------------------------------------------------------------
# tail adapter

# (T, d_in, d_out, r): odd sizes, rank 1, d_in < 2r, and r above one rank block (64).
ADAPTER_SHAPES = [(37, 96, 80, 4), (5, 40, 24, 1), (19, 6, 10, 4), (9, 20, 18, 70)]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,adapter", [(True, False), (False, True), (True, True)],
                         ids=["bias", "x_adapter", "bias+x_adapter"])
def test_tail_adapter(route, dtype, shape, bias, adapter):
    check_tail_adapter(*ROUTES[route], *shape, dtype, bias, adapter)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("adapter", [False, True])
def test_tail_adapter_backward_needs(route, adapter):
    forward, backward = ROUTES[route]
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
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
    none = backward(dy, x, W, S, P, Q, 0.5, xa, need_dx=False, need_dP=False, need_dQ=False)
    assert all(is_empty(t) for t in none)


@pytest.mark.parametrize("route", ROUTES)
def test_tail_adapter_zero_tokens(route):
    forward, backward = ROUTES[route]
    x, W, b, P, Q, _ = adapter_inputs(0, 16, 12, 2, torch.float32, True, False)
    y, S = forward(x, W, b, P, Q, 2.0)
    assert y.shape == (0, 12) and S.shape == (0, 2)
    dx, dP, dQ, dxa = backward(torch.zeros(0, 12), x, W, S, P, Q, 2.0)
    assert dx.shape == (0, 16) and is_empty(dxa)
    assert torch.equal(dP, torch.zeros(16, 2)) and torch.equal(dQ, torch.zeros(12, 2))


@pytest.mark.parametrize("route", ROUTES)
def test_tail_adapter_strided_factors(route):
    # P and Q may be strided views (head mode passes P = A.t()); x must be row-major.
    check_tail_adapter(*ROUTES[route], 13, 24, 20, 3, torch.float32, True, False, strided=True)


@pytest.mark.parametrize("route", ROUTES)
def test_tail_adapter_rejects_bad_inputs(route):
    forward, backward = ROUTES[route]
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


def test_launchers_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, W, b, P, Q, _ = adapter_inputs(7, 16, 12, 2, torch.float32, True, False)
    for forward, _ in ROUTES.values():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            forward(x, W, b, P, Q, 1.0)


# ---------------------------------------------------------------------------------------------------------
# spectral projection

# (k, d_in, d_out, r)
PROJECTION_SHAPES = [(50, 96, 80, 4), (7, 9, 12, 1), (24, 30, 20, 70)]


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spectral_projection(dtype, shape):
    check_spectral_projection(K.spectral_projection_forward, K.spectral_projection_backward, *shape, dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=ID.get)
def test_spectral_projection_in_activation_dtype(out_dtype):
    """fp32 frame and factors, P and Q written in the layer's 16-bit activation dtype (tensor cores on a GPU)."""
    check_spectral_projection(K.spectral_projection_forward, K.spectral_projection_backward, 50, 96, 80, 4,
                              torch.float32, out_dtype=out_dtype)


def test_spectral_projection_backward_one_side():
    U, V, dP, dQ = torch.randn(8, 5), torch.randn(6, 5), torch.randn(6, 2), torch.randn(8, 2)
    dA, dB = K.spectral_projection_backward(dP, dQ, U, V)
    dA_only, none_b = K.spectral_projection_backward(dP, None, U, V)
    none_a, dB_only = K.spectral_projection_backward(None, dQ, U, V)
    assert is_empty(none_a) and is_empty(none_b)
    assert torch.equal(dA_only, dA) and torch.equal(dB_only, dB)


def test_spectral_projection_rejects_bad_inputs():
    U, V, A, B = torch.randn(8, 5), torch.randn(6, 5), torch.randn(2, 5), torch.randn(5, 2)
    with pytest.raises(ValueError, match="V"):
        K.spectral_projection_forward(A, B, U, V[:, :4])
    with pytest.raises(ValueError, match="B has shape"):
        K.spectral_projection_forward(A, B[:, :1], U, V)
    with pytest.raises(ValueError, match="A has dtype"):
        K.spectral_projection_forward(A.half(), B, U, V)
    with pytest.raises(ValueError, match="out_dtype"):
        K.spectral_projection_forward(A, B, U, V, torch.float64)
    with pytest.raises(ValueError, match="dQ"):
        K.spectral_projection_backward(torch.randn(6, 2), torch.randn(7, 2), U, V)


# ---------------------------------------------------------------------------------------------------------
# split-K and tuning keys (no GPU: the split is forced, the keys are recorded instead of launched)


@pytest.mark.parametrize("split", [2, 3, 5])
def test_pair_split_k_matches_oracle(split):
    """The token reductions dQ = s·dyᵀ S and G = dy Q with the K range cut into chunks (fp32 partials, summed)."""
    g = torch.Generator().manual_seed(4)
    T, d, r = 203, 40, 3
    dy, S, Q = (torch.randn(*sh, generator=g) for sh in ((T, d), (T, r), (d, r)))
    G, dQ = torch.empty(T, r), torch.empty(d, r)
    Term = K.pair_gemm.Term
    K.pair_gemm.launch_pair(G, [Term(dy, Q)], 1.0, dQ, [Term(dy.t(), S)], 0.5, split_k=split)
    assert_close("G", G, dy @ Q, dy.double() @ Q.double(), torch.float32)
    assert_close("dQ", dQ, 0.5 * dy.t() @ S, 0.5 * dy.double().t() @ S.double(), torch.float32)


def test_split_count_fills_the_sms_only_when_the_grid_is_small():
    split_count = launch.split_count
    assert split_count(64, 8192, 132) == 2 and split_count(16, 8192, 132) == 8
    assert split_count(200, 8192, 132) == 1        # the grid already covers the SMs
    assert split_count(64, 1000, 132) == 1         # chunks would be too short
    assert split_count(64, 8192, None) == 1        # no device (interpreter)


def _record_forward(T, route="fused"):
    """The launches of one bf16 forward of a 4096x4096, rank-16 layer over T tokens (meta tensors: nothing runs)."""
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)
    with launch.recording() as launches:
        ROUTES[route][0](meta(T, 4096), meta(4096, 4096), None, meta(4096, 16), meta(4096, 16), 2.0)
    return launches


def test_tuning_keys_are_bucketed_by_token_count(monkeypatch):
    """3000 and 4000 tokens share every launch's tuning key (bucket 4096); 5000 tokens do not."""
    monkeypatch.delenv("TRITON_INTERPRET")
    keys = {T: [rec.tune_key for rec in _record_forward(T)] for T in (3000, 4000, 5000)}
    assert len(keys[3000]) == 2  # S = x_a P, then the fused GEMM
    assert keys[3000] == keys[4000]
    assert all(a != b for a, b in zip(keys[4000], keys[5000]))


def test_two_token_counts_in_one_bucket_reuse_one_tuning_entry(monkeypatch):
    """The tuner benchmarks a launch site's configs once per bucket: a second token count in the bucket is a hit."""
    monkeypatch.delenv("TRITON_INTERPRET")
    tuner = launch.Tuner()
    timed = []
    monkeypatch.setattr(launch, "benchmark", lambda fn: fn() or 1.0 + len(timed))
    (gemm_3000,) = [r for r in _record_forward(3000) if "fused" in r.site]
    (gemm_4000,) = [r for r in _record_forward(4000) if "fused" in r.site]
    (gemm_5000,) = [r for r in _record_forward(5000) if "fused" in r.site]
    configs = gemm_4000.configs
    assert len(configs) >= 2
    for rec in (gemm_3000, gemm_4000, gemm_3000):
        chosen = tuner.choose(rec.tune_key, configs, timed.append, can_benchmark=True)
        assert chosen in configs
    assert tuner.benchmarks == len(configs) and len(timed) == len(configs) and len(tuner.best) == 1
    tuner.choose(gemm_5000.tune_key, configs, timed.append, can_benchmark=True)
    assert tuner.benchmarks == 2 * len(configs) and len(tuner.best) == 2
    # While a CUDA graph is captured nothing is benchmarked: a miss runs the first (heuristic) config.
    assert tuner.choose(("other",), configs, timed.append, can_benchmark=False) is configs[0]
    assert tuner.benchmarks == 2 * len(configs)


def test_gemm_configs_include_hopper_tiles():
    sizes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
             for c in launch.gemm_configs(torch.bfloat16)}
    assert (128, 256, 64, 8) in sizes
    assert all(c.kwargs["BLOCK_N"] <= 128 for c in launch.gemm_configs(torch.float32))


# ---------------------------------------------------------------------------------------------------------
# spectral penalty


@pytest.mark.parametrize("dtype", DTYPES, ids=ID.get)
@pytest.mark.parametrize("mode", ["full", "head"])
@pytest.mark.parametrize("r", [1, 5, 40])
def test_spectral_penalty(dtype, mode, r):
    check_spectral_penalty(K.spectral_penalty_forward, K.spectral_penalty_backward, mode, r, dtype)


@pytest.mark.parametrize("mode", ["full", "head"])
def test_spectral_penalty_gradients_match_autograd(mode):
    # The closed forms used as oracle above agree with autograd on the float64 Gram-form value.
    A, B, U, V, w = penalty_inputs(mode, 3, torch.float64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    penalty_eager(A, B, U, V, w.double(), 0.3).backward(torch.tensor(1.7, dtype=torch.float64))
    dA, dB = penalty_grads_eager(A.detach(), B.detach(), U, V, w.double(), 0.3, 1.7)
    torch.testing.assert_close(A.grad, dA)
    torch.testing.assert_close(B.grad, dB)
    # ... and with the definition λ(‖Ω_Uᵀ ΔW‖² + ‖ΔW Ω_V‖²) (orthonormal frame, s folded into c).
    if mode == "full":
        k = A.shape[1]
        Uf = torch.linalg.qr(torch.randn(k + 3, k, dtype=torch.float64))[0]
        Vf = torch.linalg.qr(torch.randn(k + 5, k, dtype=torch.float64))[0]
        dW = Uf @ B @ A @ Vf.T
        om = w.double().sqrt()
        direct = 0.3 * ((om[:, None] * (Uf.T @ dW)).square().sum() + ((dW @ Vf) * om).square().sum())
    else:
        dW = B @ A
        om = w.double().sqrt()
        direct = 0.3 * ((om[:, None] * (U.T @ dW)).square().sum() + ((dW @ V) * om).square().sum())
    torch.testing.assert_close(penalty_eager(A, B, U, V, w.double(), 0.3), direct)


def test_spectral_penalty_rejects_bad_inputs():
    A, B, U, V, w = penalty_inputs("head", 2, torch.float32)
    with pytest.raises(ValueError, match="U and V"):
        K.spectral_penalty_forward(A, B, U, None, w, 1.0)
    with pytest.raises(ValueError, match="omega2 has length"):
        K.spectral_penalty_forward(A, B, U, V, w[:-1], 1.0)
    with pytest.raises(ValueError, match="V has shape"):
        K.spectral_penalty_forward(A, B, U, V[:-1], w, 1.0)
    with pytest.raises(ValueError, match="omega2 must be contiguous"):
        K.spectral_penalty_forward(A, B, U, V, torch.rand(2 * w.shape[0])[::2], 1.0)
    with pytest.raises(ValueError, match="grad"):
        K.spectral_penalty_backward(torch.ones(2), A, B, U, V, w, 1.0)
    Af, Bf, _, _, wf = penalty_inputs("full", 2, torch.float32)
    with pytest.raises(ValueError, match="B has shape"):
        K.spectral_penalty_forward(Af, Bf[:-1], None, None, wf, 1.0)


# ---------------------------------------------------------------------------------------------------------
# ahead-of-time compilation of the real call sites (no GPU, no interpreter)


def _kernel_names():
    names = set()
    for module in (K.tail_adapter, K.pair_gemm, K.spectral_projection, K.spectral_penalty):
        names |= {n for n, obj in vars(module).items() if n.endswith("_kernel") and hasattr(obj, "fn")}
    return names


def test_aot_specializations_are_the_call_sites(monkeypatch):
    """check-kernels compiles what the launchers really launch: every kernel, every activation dtype, integers
    equal to 1 (unit strides) and divisible by 16, an odd token count, the split-K workspace, Hopper tiles."""
    monkeypatch.delenv("TRITON_INTERPRET")
    from taillor.check_kernels import config_for, specializations
    entries = specializations()
    assert {e["kernel"].fn.__name__ for e in entries} == _kernel_names() == {
        "_tail_gemm_kernel", "_pair_kernel", "_penalty_gram_kernel"}
    labels = {e["dtype"] for e in entries}
    assert {"fp32 T%16=0", "fp16 T%16=0", "bf16 T%16=0", "bf16 odd T", "fp32 -> bf16", "fp32"} <= labels
    def ints(entry):
        return [a for a in entry["args"] if isinstance(a, int) and not isinstance(a, bool)]

    gemm = [e for e in entries if e["kernel"].fn.__name__ == "_tail_gemm_kernel" and e["dtype"] == "bf16 odd T"]
    assert gemm and all(8191 in ints(e) for e in gemm)
    assert all(1 in ints(e) and 4096 in ints(e) for e in gemm)  # unit strides (== 1) and 16-divisible sizes
    split_k = [e for e in entries if "dP" in e["site"] and any(
        isinstance(a, torch.Tensor) and a.dim() == 3 and a.dtype == torch.float32 for a in e["args"])]
    assert split_k, "the split-K workspace launch of dP = s x_aT G is not among the compiled specializations"
    bf16_fused = next(e for e in entries if "fused y" in e["site"] and e["dtype"] == "bf16 T%16=0")
    assert config_for(bf16_fused, 90).kwargs["BLOCK_N"] == 256
    fp32_pair = next(e for e in entries if e["kernel"].fn.__name__ == "_pair_kernel" and e["dtype"] == "fp32 T%16=0")
    assert all(config_for(fp32_pair, cc) in fp32_pair["configs"] for cc in (80, 90))


@pytest.mark.slow
def test_check_kernels_compiles_for_sm80_and_sm90(monkeypatch):
    """A subset here (the projections: 3 specializations x 2 archs); `make test` runs the whole check."""
    monkeypatch.delenv("TRITON_INTERPRET")
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "taillor.check_kernels", "--arch", "sm_80,sm_90",
                           "--only", "projection forward"], env=dict(os.environ), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("_pair_kernel")]
    assert len(rows) == 6 and all(ln.rstrip().endswith("ok") for ln in rows), proc.stdout
    for label in ("fp32 -> fp32", "fp32 -> fp16", "fp32 -> bf16"):
        for arch in ("sm_80", "sm_90"):
            assert any(label in ln and arch in ln for ln in rows), (label, arch)
