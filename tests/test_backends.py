"""The backend registry (taillor/backends/): coverage of every op, the choice per device type, dtype and setting,
use_backend's scope, and the cache of resolved choices. No GPU needed: choices are resolved for device *types*."""
from __future__ import annotations

import threading

import pytest
import torch

import taillor
from taillor import backends, ops
from conftest import assert_close, assert_matches_oracle

ADAPTER_OPS = ("tail_adapter_fwd", "tail_adapter_bwd")
TRITON_OPS = ADAPTER_OPS + ("spectral_projection_fwd", "spectral_projection_bwd", "spectral_penalty_fwd",
                            "spectral_penalty_bwd")


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch):
    for var in ("TAILLOR_BACKEND", "TAILLOR_ADAPTER_IMPL", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)


def test_registry_covers_every_op():
    table = backends.registered()
    assert set(table) == set(ops.OPS)
    for name in ops.OPS:
        assert table[name][0] == "eager"
    for name in ADAPTER_OPS:
        assert set(table[name]) == {"eager", "triton-fused", "triton-split", "triton-onepass"}
    for name in set(TRITON_OPS) - set(ADAPTER_OPS):
        assert set(table[name]) == {"eager", "triton"}
    assert set(table["randomized_svd"]) == {"eager", "cuda_ext"}
    with pytest.raises(ValueError, match="already has"):
        backends.register_impl("randomized_svd", "eager", ("cpu",), lambda: None)


def choice(op, device="cuda", dtype=torch.float32, args=None):
    return backends.chosen_backend(op, device, dtype, args)


def test_auto_picks_native_kernels_on_cuda_and_eager_elsewhere():
    triton_ok = backends.triton_unavailable() is None
    for op in TRITON_OPS:
        assert choice(op, "cpu") == "eager"
        if triton_ok:
            expected = "triton-split" if op in ADAPTER_OPS else "triton"
            assert choice(op) == expected
            assert choice(op, dtype=torch.float64) == "eager"  # no float64 Triton kernels: eager, not an error
    ext = backends.cuda_extension() is not None
    assert choice("randomized_svd") == ("cuda_ext" if ext else "eager")
    assert choice("randomized_svd", "cpu") == "eager"


def test_eager_setting_and_adapter_route(monkeypatch):
    monkeypatch.setenv("TAILLOR_BACKEND", "eager")
    assert all(choice(op) == "eager" for op in ops.OPS)
    monkeypatch.setenv("TAILLOR_BACKEND", "auto")
    monkeypatch.setenv("TAILLOR_ADAPTER_IMPL", "fused")
    if backends.triton_unavailable() is None:
        assert choice("tail_adapter_fwd") == "triton-fused" and choice("spectral_penalty_fwd") == "triton"
    monkeypatch.setenv("TAILLOR_ADAPTER_IMPL", "nope")
    with pytest.raises(ValueError, match="TAILLOR_ADAPTER_IMPL.*'nope'"):
        choice("tail_adapter_fwd")
    monkeypatch.setenv("TAILLOR_BACKEND", "fast")
    with pytest.raises(ValueError, match="TAILLOR_BACKEND.*'fast'"):
        backends.requested_backend()


def test_triton_setting_forces_triton_ops_only(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TAILLOR_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        choice("tail_adapter_fwd", "cpu")
    with pytest.raises(RuntimeError, match="float64"):
        choice("spectral_projection_fwd", "cuda", torch.float64)
    # randomized_svd has no Triton kernel: `triton` keeps its auto choice and never forces the extension.
    assert choice("randomized_svd", "cpu") == "eager"
    monkeypatch.setattr(backends, "cuda_extension", lambda: None)
    backends._resolve.cache_clear()
    assert choice("randomized_svd") == "eager"
    backends._resolve.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read per call: now CPU tensors may take the Triton kernels
    assert choice("tail_adapter_fwd", "cpu") == "triton-split"  # auto route, no arguments: onepass's rule unmet
    assert choice("spectral_penalty_bwd", "cpu") == "triton"


def test_use_backend_scopes_the_setting(monkeypatch):
    monkeypatch.setenv("TAILLOR_BACKEND", "triton")
    assert backends.requested_backend() == "triton"
    with taillor.use_backend("eager"):
        assert backends.requested_backend() == "eager"
        assert choice("tail_adapter_fwd") == "eager"
        with taillor.use_backend(adapter="fused"):
            assert backends.requested_backend() == "eager" and backends.adapter_route() == "fused"
        assert backends.adapter_route() == "auto"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(backends.requested_backend()))
        worker.start()
        worker.join()
        assert seen == ["triton"]  # another thread keeps the environment's setting
    assert backends.requested_backend() == "triton"
    import os
    assert os.environ["TAILLOR_BACKEND"] == "triton"  # never mutated
    with pytest.raises(ValueError, match="'cuda'"):
        with taillor.use_backend("cuda"):
            pass


def test_choices_are_cached_per_device_type_dtype_and_setting():
    backends._resolve.cache_clear()
    for _ in range(3):
        choice("spectral_penalty_fwd", "cpu")
    info = backends._resolve.cache_info()
    assert info.misses == 1 and info.hits == 2  # one resolution, then cache hits
    choice("spectral_penalty_fwd", "cpu", torch.float16)
    with taillor.use_backend("eager"):
        choice("spectral_penalty_fwd", "cpu")
    assert backends._resolve.cache_info().misses == 3


def test_layer_runs_the_chosen_backend_on_the_cpu(interpreter):
    """End to end: use_backend("triton") on CPU tensors (interpreter) runs the Triton kernels, "eager" does not."""
    from taillor import _kernels
    calls = []
    layer = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=2, head=4)
    x = torch.randn(5, 24)
    original = _kernels.tail_adapter_split_forward
    try:
        _kernels.tail_adapter_split_forward = lambda *a: calls.append(1) or original(*a)
        with taillor.use_backend("triton"):
            y_triton = layer(x)
        with taillor.use_backend("eager"):
            y_eager = layer(x)
    finally:
        _kernels.tail_adapter_split_forward = original
    assert calls == [1]
    assert_close(y_triton, y_eager, "reordered", "triton vs eager")


# ---------------------------------------------------------------------------------------------------------------
# choice by predicate and priority
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def scratch_op():
    """A registry op of its own (no torch op): eager plus whatever the test registers, removed afterwards."""
    name = "registry_test_op"
    backends.register_impl(name, "eager", ("cpu", "cuda"), lambda: (lambda n: "eager"))
    yield name
    for backend in list(backends.registered(name).get(name, [])):
        backends.unregister_impl(name, backend)


def _native(op, backend, priority, predicate=None, devices=("cpu",)):
    backends.register_impl(op, backend, devices, lambda: (lambda n: backend), family="native", priority=priority,
                           predicate=predicate)


def test_highest_priority_whose_predicate_holds_runs(scratch_op):
    _native(scratch_op, "low", 1)
    _native(scratch_op, "high", 5, lambda n: n > 10)
    _native(scratch_op, "mid", 3, lambda n: n > 5)
    for n, expected in ((20, "high"), (7, "mid"), (1, "low")):
        assert backends.impl_for(scratch_op, "cpu", torch.float32, (n,))(n) == expected
        assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (n,)) == expected
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32) == "low"  # no arguments: predicates skipped
    assert backends.chosen_backend(scratch_op, "cuda", torch.float32, (20,)) == "eager"  # none for CUDA
    with taillor.use_backend("eager"):
        assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (20,)) == "eager"


def test_equal_priorities_keep_registration_order_and_eager_is_the_fallback(scratch_op):
    _native(scratch_op, "first", 2, lambda n: n % 2 == 0)
    _native(scratch_op, "second", 2, lambda n: n % 3 == 0)
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (6,)) == "first"
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (9,)) == "second"
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (7,)) == "eager"  # every predicate false
    _native(scratch_op, "late", 9, lambda n: n == 7)  # a registration clears the cached candidates
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (7,)) == "late"
    backends.unregister_impl(scratch_op, "late")
    assert backends.chosen_backend(scratch_op, "cpu", torch.float32, (7,)) == "eager"
    with pytest.raises(TypeError, match="predicate"):
        backends.register_impl(scratch_op, "bad", ("cpu",), lambda: None, predicate=3)
    with pytest.raises(KeyError, match="'missing'"):
        backends.unregister_impl(scratch_op, "missing")


def test_adapter_route_rule_and_forced_routes(monkeypatch):
    pytest.importorskip("triton")
    if backends.triton_unavailable() is not None:
        pytest.skip(backends.triton_unavailable())
    from taillor.backends import onepass

    def fwd_args(tokens, d, r=16):
        x, W, P = (torch.empty(*s, device="meta") for s in ((tokens, d), (d, d), (d, r)))
        return (x, W, None, P, torch.empty(d, r, device="meta"), 1.0, None)

    def bwd_args(tokens, d, r=16):
        x, W, S, P = (torch.empty(*s, device="meta") for s in ((tokens, d), (d, d), (tokens, r), (d, r)))
        return (x, x, W, S, P, P, 1.0, None, True, True, True)

    big, small = onepass.MIN_TOKENS, onepass.MIN_TOKENS - 1
    assert choice("tail_adapter_fwd", args=fwd_args(big, 2048)) == "triton-onepass"
    assert choice("tail_adapter_bwd", args=bwd_args(big, 2048)) == "triton-onepass"
    assert choice("tail_adapter_fwd", args=fwd_args(small, 2048)) == "triton-split"
    assert choice("tail_adapter_bwd", args=bwd_args(big, 1024)) == "triton-split"  # weight below the rule
    assert choice("tail_adapter_bwd", args=bwd_args(big, 2048, r=65)) == "triton-split"
    assert choice("tail_adapter_fwd", "cpu", args=fwd_args(big, 2048)) == "eager"  # auto never interprets
    for route in ("split", "fused", "onepass"):  # a named route is forced, whatever the size
        with taillor.use_backend(adapter=route):
            assert choice("tail_adapter_fwd", args=fwd_args(small, 64)) == f"triton-{route}"
    monkeypatch.setenv("TAILLOR_ADAPTER_IMPL", "onepass")
    assert choice("tail_adapter_bwd", args=bwd_args(small, 64)) == "triton-onepass"


def test_layer_runs_a_forced_onepass_route_on_the_cpu(interpreter):
    from taillor import _kernels
    calls = []
    layer = taillor.TailLoRLinear.from_linear(torch.nn.Linear(24, 20), rank=2, head=4)
    x = torch.randn(5, 24, requires_grad=True)
    original = _kernels.tail_adapter_onepass_backward
    try:
        _kernels.tail_adapter_onepass_backward = lambda *a: calls.append(1) or original(*a)
        with taillor.use_backend("triton", adapter="onepass"):
            layer(x).square().sum().backward()
        grad_triton, x.grad = x.grad, None
        with taillor.use_backend("eager"):
            layer(x).square().sum().backward()
    finally:
        _kernels.tail_adapter_onepass_backward = original
    assert calls == [1]
    assert_close(grad_triton, x.grad, "reordered", "dx, onepass vs eager")


# ---------------------------------------------------------------------------------------------------------------
# docs/architecture.md's backend recipe, executed
# ---------------------------------------------------------------------------------------------------------------
def _recipe_block() -> str:
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    section = text[text.index("### Add a kernel backend"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]


def test_backend_recipe_example_runs(interpreter, monkeypatch):
    """The recipe's registration file, run as taillor/backends/triton_wide.py with a stand-in kernel module:
    through the torch op, rank 40 runs triton-wide (priority 10, predicate true), rank 4 the Triton kernel."""
    import sys
    import types
    from taillor.eager import spectral_penalty as eager_penalty
    calls = []
    kernels = types.ModuleType("taillor._kernels.spectral_penalty_wide")
    kernels.spectral_penalty_forward = lambda *a: calls.append("fwd") or eager_penalty.spectral_penalty_forward(*a)
    kernels.spectral_penalty_backward = lambda *a: calls.append("bwd") or eager_penalty.spectral_penalty_backward(*a)
    monkeypatch.setitem(sys.modules, kernels.__name__, kernels)
    module = types.ModuleType("taillor.backends.triton_wide")
    module.__package__ = "taillor.backends"
    try:
        exec(compile(_recipe_block(), "docs/architecture.md (recipe)", "exec"), module.__dict__)
        assert backends.registered("spectral_penalty_fwd")["spectral_penalty_fwd"][-1] == "triton-wide"
        g = torch.Generator().manual_seed(0)
        for rank, expected in ((40, ["fwd", "bwd"]), (4, [])):
            calls.clear()
            A = torch.randn(rank, 48, generator=g, dtype=torch.float64).float().requires_grad_()
            B = torch.randn(48, rank, generator=g, dtype=torch.float64).float().requires_grad_()
            w = torch.rand(48, generator=g)
            with taillor.use_backend("triton"):
                value = ops.spectral_penalty_fwd(A, B, None, None, w, 0.5)  # torch's dispatcher, CPU kernel
                dA, dB = ops.spectral_penalty_bwd(torch.ones(()), A, B, None, None, w, 0.5)
            assert calls == expected
            # Dense float64 oracle: c·(‖diag(ω) M‖² + ‖M diag(ω)‖²), M = B A, and its gradients.
            A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
            omega = w.double().sqrt()
            M = B64 @ A64
            oracle = 0.5 * ((omega[:, None] * M).pow(2).sum() + (M * omega[None, :]).pow(2).sum())
            oracle.backward()
            assert_matches_oracle(value, oracle.detach(), torch.float32, f"penalty, rank {rank}")
            assert_matches_oracle(dA, A64.grad, torch.float32, f"dA, rank {rank}")
            assert_matches_oracle(dB, B64.grad, torch.float32, f"dB, rank {rank}")
    finally:
        for op in ("spectral_penalty_fwd", "spectral_penalty_bwd"):
            if "triton-wide" in backends.registered(op)[op]:
                backends.unregister_impl(op, "triton-wide")
