"""The backend registry (taillor/backends/): coverage of every op, the choice per device type, dtype and setting,
use_backend's scope, and the cache of resolved choices. No GPU needed: choices are resolved for device *types*."""
from __future__ import annotations

import threading

import pytest
import torch

import taillor
from taillor import backends, ops
from conftest import assert_close

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


def choice(op, device="cuda", dtype=torch.float32):
    return backends.chosen_backend(op, device, dtype)


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
