"""What ``taillor check-kernels`` compiles, without compiling: every config a launch site could run on each
architecture, both factor layouts of the adapter (full frame: P contiguous; head frame: P = Aᵀ strided) for every
route, and one table row per (specialization, architecture, config)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton")


@pytest.fixture
def entries(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from taillor.check_kernels import specializations
    return specializations()


def _tensor_args(entry):
    return [a for a in entry["args"] if isinstance(a, torch.Tensor)]


def test_every_route_is_recorded_with_both_factor_layouts(entries):
    """Every route's launches are recorded in both layouts (check-kernels then compiles each distinct
    specialization once: a split or onepass launch identical to a fused one is not compiled twice)."""
    from taillor.kernel_call_sites import record_call_sites
    sites = {name for name, _, _ in record_call_sites()}
    for route in ("split", "fused", "onepass"):
        for direction in ("forward", "backward"):
            for layout in ("full P", "head P"):
                assert any(s.startswith(f"{route} {direction} ({layout})") for s in sites), (route, direction, layout)
    # The head frame's P is a transposed view: unit stride along d_in's rows, so P (d_in, r) has strides (1, d_in).
    head_S = [e for e in entries if "head P" in e["site"] and "S = x_a P" in e["site"]]
    assert head_S and all(any(t.dim() == 2 and t.shape == (4096, 16) and t.stride() == (1, 4096)
                               for t in _tensor_args(e)) for e in head_S)
    full_S = [e for e in entries if "full P" in e["site"] and "S = x_a P" in e["site"]]
    assert full_S and all(any(t.dim() == 2 and t.shape == (4096, 16) and t.stride() == (16, 1)
                              for t in _tensor_args(e)) for e in full_S)


def test_every_config_that_fits_is_compiled(entries, monkeypatch, capsys):
    from taillor import check_kernels
    from taillor._kernels.launch import smem_estimate
    for entry in entries:
        for cc, limit in check_kernels.SHARED_LIMITS.items():
            kept = check_kernels.configs_for(entry, cc)
            if len(entry["configs"]) == 1:  # a fixed launch config (penalty Grams, fp32 pair sites)
                assert kept == entry["configs"]
                continue
            itemsize, width = entry["smem"]
            assert kept == [c for c in entry["configs"] if smem_estimate(c, itemsize, width) <= limit]
    built = []

    def fake_build(index, cc, config_index, only):  # record the job instead of compiling it
        built.append((index, cc, config_index))
        return 1024, 4, None

    monkeypatch.setattr(check_kernels, "_build", fake_build)
    assert check_kernels.main(["--arch", "sm_80,sm_90", "--jobs", "1", "--only", "onepass"]) == 0
    selected = [e for e in entries if "onepass" in e["site"]]
    expected = {(i, cc, c) for i, e in enumerate(selected) for cc in (80, 90)
                for c in range(len(check_kernels.configs_for(e, cc)))}
    assert set(built) == expected and len(built) == len(expected)
    assert any(len(check_kernels.configs_for(e, 90)) >= 3 for e in selected)  # several configs per site
    out = capsys.readouterr().out
    assert f"{len(expected)}/{len(expected)} kernel builds" in out and "every config" in out
    built.clear()
    assert check_kernels.main(["--arch", "sm_90", "--jobs", "1", "--only", "onepass", "--largest-only"]) == 0
    assert len(built) == len(selected)


def test_a_config_over_the_limit_fails_the_check(monkeypatch, capsys):
    from taillor import check_kernels
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(check_kernels, "_build", lambda index, cc, c, only: (10 ** 7, 4, None))
    assert check_kernels.main(["--arch", "sm_90", "--jobs", "1", "--only", "onepass G"]) == 1
    assert "FAIL: shared memory over limit" in capsys.readouterr().out
