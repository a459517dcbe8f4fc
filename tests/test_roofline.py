"""The byte and FLOP model of the adapter routes (taillor/bench/roofline.py, ``taillor bench --roofline``): the
speed goal's shape has a route whose modelled floor is at most 1.07x the frozen layer (head frame), the full
frame's floor is listed, and the model's counts match the arithmetic written out here."""
from __future__ import annotations

import pytest

from taillor.bench import roofline
from taillor.bench.command import main as bench_main

T, N, R = 8192, 4096, 16
X = T * N * 2  # one bf16 activation of the target shape, bytes


def test_a_route_reaches_the_goal_at_the_target_shape_and_the_full_frame_is_listed():
    rows = [row for row in roofline.table("H200") if row["shape"] == roofline.TARGET]
    head = {row["route"]: row for row in rows if row["frame"] == "head"}
    full = {row["route"]: row for row in rows if row["frame"] == "full"}
    assert set(head) == set(full) == set(roofline.ROUTES)
    best = min(head.values(), key=lambda row: row["floor"])
    assert best["route"] == "onepass" and best["floor"] <= 1.07 and best["auto"]
    assert head["split"]["floor"] > head["fused"]["floor"] > head["onepass"]["floor"] > 1.0
    for route in roofline.ROUTES:  # the full frame adds the projections through U and V (fp32), both directions
        assert full[route]["floor"] > head[route]["floor"]
        assert full[route]["measured"] is None


def test_bytes_and_flops_match_the_arithmetic():
    base = roofline.frozen_layer(T, N, N)
    assert roofline.total_bytes(base) == 2 * (2 * X + N * N * 2) + 2 * N  # x, W, y and dy, W, dx; bias
    assert roofline.total_flops(base) == 2 * (2.0 * T * N * N)
    extra = {route: roofline.total_bytes(roofline.route_launches(route, T, N, N, R)) - roofline.total_bytes(base)
             for route in roofline.ROUTES}
    # split: x_a for S, y read and rewritten, dy twice, x_a for dP, dx read and rewritten -> 8 activations
    # (plus the rank-r tensors)
    assert 8 * X < extra["split"] < 8 * X + 8e6
    # fused: x_a for S, dy twice, x_a for dP -> 4 activations
    assert 4 * X < extra["fused"] < 4 * X + 8e6
    # onepass: x_a for S, dy once, x_a's tiles inside the dx GEMM -> 3 activations, plus fp32 partials:
    n_i, n_j = roofline.dy_pass_programs(T, N, 132)
    partials = 2 * 4 * R * (n_j * T + n_i * N) + 2 * 4 * (T // 128) * N * R
    assert 3 * X + partials < extra["onepass"] < 3 * X + partials + 8e6
    rank_flops = 2.0 * T * R * N * 6  # S, S Qᵀ, G, dQ, dP, G Pᵀ
    for route in roofline.ROUTES:
        flops = roofline.total_flops(roofline.route_launches(route, T, N, N, R)) - roofline.total_flops(base)
        assert flops == pytest.approx(rank_flops)


def test_launch_time_is_the_larger_of_its_bytes_and_flops():
    bandwidth, peak, _, _ = roofline.DEVICES["H200"]
    memory_bound = roofline.Launch("stream", bytes=X, flops=1.0)
    compute_bound = roofline.Launch("gemm", bytes=1.0, flops=1e12)
    assert memory_bound.seconds("H200", 1.0, 1.0) == pytest.approx(X / bandwidth)
    assert compute_bound.seconds("H200", 0.5, 0.5) == pytest.approx(1e12 / (0.5 * peak))
    with pytest.raises(ValueError, match="route"):
        roofline.route_launches("fast", T, N, N, R)
    with pytest.raises(ValueError, match="device"):
        roofline.floor("onepass", device="B200")


def test_dy_pass_grid_matches_the_kernels():
    pytest.importorskip("triton")
    from taillor._kernels.tail_adapter_onepass import dy_pass_grid
    for tokens, d_out, sm in ((8192, 4096, 132), (2048, 11008, 132), (100, 64, 108), (8191, 4096, 108)):
        assert dy_pass_grid(tokens, d_out, sm) == roofline.dy_pass_programs(tokens, d_out, sm)


def test_bench_roofline_prints_the_table(capsys):
    assert bench_main(["--roofline", "H100"]) == 0
    out = capsys.readouterr().out
    assert "on H100" in out and "onepass*" in out and "not measured" in out
    assert bench_main(["--roofline", "B200"]) == 2
