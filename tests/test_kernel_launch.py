"""The launch rules of the Triton kernels (kernels/launch.py) and the shared pair GEMM (kernels/pair_gemm.py):
the device rule, split-K, bucketed tuning keys, the tuning cache, the tile configs, and the ahead-of-time
compilation of the real call sites (``taillor check-kernels``). No GPU needed except for the tests marked ``gpu``.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DTYPE_ID, DTYPES, assert_matches_oracle, kernel_impls
from test_tail_adapter import adapter_inputs

# Only a missing Triton skips this file; a broken import of the project's own kernels fails it.
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels' launch rules need it")
import taillor._kernels as K  # noqa: E402
from taillor._kernels import launch  # noqa: E402

ROUTES = {"fused": (K.tail_adapter_forward, K.tail_adapter_backward),
          "split": (K.tail_adapter_split_forward, K.tail_adapter_split_backward)}


def test_launchers_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b, P, Q, _ = adapter_inputs(7, 16, 12, 2, torch.float32, True, False)
    for forward, _ in ROUTES.values():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            forward(x, W, b, P, Q, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# split-K of the token reductions (forced here; on a GPU also the automatic choice)
# ---------------------------------------------------------------------------------------------------------------
def check_token_reductions(T, d, r, dtype, device, split):
    """G = dy Q and dQ = s·dyᵀ S in one pair launch, the K range cut into ``split`` chunks (fp32 partials)."""
    g = torch.Generator().manual_seed(4)
    dy, S, Q = (torch.randn(*sh, generator=g).to(device, dtype) for sh in ((T, d), (T, r), (d, r)))
    G = torch.empty(T, r, device=device, dtype=dtype)
    dQ = torch.empty(d, r, device=device, dtype=dtype)
    Term = K.pair_gemm.Term
    K.pair_gemm.launch_pair(G, [Term(dy, Q)], 1.0, dQ, [Term(dy.t(), S)], 0.5, split_k=split)
    dy64, S64, Q64 = (t.double().cpu() for t in (dy, S, Q))
    assert_matches_oracle(G, dy64 @ Q64, dtype, "G", eager=dy @ Q)
    assert_matches_oracle(dQ, 0.5 * dy64.t() @ S64, dtype, "dQ", eager=0.5 * (dy.t() @ S))


@pytest.mark.parametrize("impl", kernel_impls("pair_gemm", ("interpreter",)), indirect=True)
@pytest.mark.parametrize("split", [2, 3, 5])
def test_pair_split_k_matches_oracle(impl, split):
    check_token_reductions(203, 40, 3, torch.float32, impl.device, split)


@pytest.mark.parametrize("impl", kernel_impls("pair_gemm", ("compiled",)), indirect=True)
@pytest.mark.parametrize("split", [None, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_compiled_token_reductions_split_k(impl, split, dtype):
    """dQ = s·dyᵀ S and dP-like reductions over 4099 tokens with the automatic or a forced split-K."""
    check_token_reductions(4099, 256, 16, dtype, impl.device, split)


def test_split_count_fills_the_sms_only_when_the_grid_is_small():
    split_count = launch.split_count
    assert split_count(64, 8192, 132) == 2 and split_count(16, 8192, 132) == 8
    assert split_count(200, 8192, 132) == 1        # the grid already covers the SMs
    assert split_count(64, 1000, 132) == 1         # chunks would be too short
    assert split_count(64, 8192, None) == 1        # no device (interpreter)


# ---------------------------------------------------------------------------------------------------------------
# tuning keys and the tuning cache (no GPU: keys are recorded instead of launched)
# ---------------------------------------------------------------------------------------------------------------
def _record_forward(T, route="fused"):
    """The launches of one bf16 forward of a 4096x4096, rank-16 layer over T tokens (meta tensors: nothing runs)."""
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)
    with launch.recording() as launches:
        ROUTES[route][0](meta(T, 4096), meta(4096, 4096), None, meta(4096, 16), meta(4096, 16), 2.0)
    return launches


def test_tuning_keys_are_bucketed_by_token_count(monkeypatch):
    """3000 and 4000 tokens share every launch's tuning key (bucket 4096); 5000 tokens do not."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    keys = {T: [rec.tune_key for rec in _record_forward(T)] for T in (3000, 4000, 5000)}
    assert len(keys[3000]) == 2  # S = x_a P, then the fused GEMM
    assert keys[3000] == keys[4000]
    assert all(a != b for a, b in zip(keys[4000], keys[5000]))


def test_two_token_counts_in_one_bucket_reuse_one_tuning_entry(monkeypatch):
    """The tuner benchmarks a launch site's configs once per bucket: a second token count in the bucket is a hit."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
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


@pytest.mark.parametrize("impl", kernel_impls("tail_adapter", ("compiled",))[:1], indirect=True)
def test_compiled_tuning_reuses_one_entry_per_bucket(impl, monkeypatch):
    """On the GPU: tuning on, 3000 then 4000 tokens tune the fused GEMM once (one bucket)."""
    monkeypatch.setenv("TAILLOR_AUTOTUNE", "1")
    monkeypatch.setattr(launch, "TUNER", launch.Tuner())
    x3, W, b, P, Q, _ = adapter_inputs(3000, 512, 384, 16, torch.bfloat16, True, False, impl.device)
    K.tail_adapter_forward(x3, W, b, P, Q, 2.0)
    timed = launch.TUNER.benchmarks
    assert timed > 0
    x4 = torch.randn(4000, 512, device=impl.device, dtype=torch.bfloat16)
    K.tail_adapter_forward(x4, W, b, P, Q, 2.0)
    assert launch.TUNER.benchmarks == timed


def test_gemm_configs_include_hopper_tiles():
    sizes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
             for c in launch.gemm_configs(torch.bfloat16)}
    assert (128, 256, 64, 8) in sizes
    assert all(c.kwargs["BLOCK_N"] <= 128 for c in launch.gemm_configs(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation of the real call sites (no GPU, no interpreter)
# ---------------------------------------------------------------------------------------------------------------
def _kernel_names():
    names = set()
    for module in (K.tail_adapter, K.tail_adapter_onepass, K.pair_gemm, K.spectral_projection, K.spectral_penalty,
                   K.spectral_penalty_batched):
        names |= {n for n, obj in vars(module).items() if n.endswith("_kernel") and hasattr(obj, "fn")}
    return names


def test_aot_specializations_are_the_call_sites(monkeypatch):
    """check-kernels compiles what the launchers really launch: every kernel, every activation dtype, integers
    equal to 1 (unit strides) and divisible by 16, an odd token count, the split-K workspace, Hopper tiles."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from taillor.check_kernels import config_for, specializations
    entries = specializations()
    assert {e["kernel"].fn.__name__ for e in entries} == _kernel_names() == {
        "_tail_gemm_kernel", "_pair_kernel", "_penalty_gram_kernel", "_dy_pass_kernel", "_batched_gram_kernel"}
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
    """A subset here (the projections: 3 specializations x every config x 2 archs); `make test` runs the whole
    check."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from taillor.check_kernels import specializations
    expected = 2 * sum(len(e["configs"]) for e in specializations() if "projection forward" in e["site"])
    proc = subprocess.run([sys.executable, "-m", "taillor.check_kernels", "--arch", "sm_80,sm_90",
                           "--only", "projection forward"], env=dict(os.environ), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("_pair_kernel")]
    assert len(rows) == expected >= 6 and all(ln.rstrip().endswith("ok") for ln in rows), proc.stdout
    for label in ("fp32 -> fp32", "fp32 -> fp16", "fp32 -> bf16"):
        for arch in ("sm_80", "sm_90"):
            assert any(label in ln and arch in ln for ln in rows), (label, arch)

