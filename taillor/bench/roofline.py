"""Byte and FLOP model of every adapter route, and its floor against the frozen layer (``taillor bench --roofline``).

What is modelled: one training step of one layer, forward plus the input-gradient backward — the frozen
``nn.Linear``'s own work (y = x Wᵀ + b, dx = dy W) is the reference; a route adds its rank-r work, its extra
passes over activations, and in the full frame the projection of the factors through the frame (P = V Aᵀ,
Q = U B and their gradients, U and V read in their stored float32). Every launch of a route is listed with the
bytes it must move through HBM (each operand read once, each output written once, fp32 workspaces and their
reductions included) and its FLOPs (2 per multiply-add). A launch takes

    time = max(bytes / (η_mem · bandwidth), FLOPs / (η_gemm · peak))

and a route's time is the sum over its launches (one stream, no overlap between launches). The floor ratio is a
route's time over the frozen layer's. It is a floor: per-launch latency, tail effects, and the gap between a
Triton GEMM and cuBLAS (the fused and onepass routes run their big GEMMs in Triton) come on top, and only a GPU
measurement tells them (``benchmarks/gpu_check.sh``).

Routes (kernels/tail_adapter*.py, X = T·n elements of bf16 activation, n = 4096, T = 8192: 64 MiB each):

* split:   S = x_a P (reads x_a); cuBLAS y = x Wᵀ + b; y += s·S Qᵀ (rewrites y). Backward: G = dy Q and
  dQ = s·dyᵀ S (two program groups, each reads dy); dP = s·x_aᵀ G (reads x_a); cuBLAS dx = dy W; dx += s·G Pᵀ
  (rewrites dx). Extra: 4 reads and 2 read-modify-writes of a T×n activation ≈ 8 X.
* fused:   S = x_a P; one GEMM y = x Wᵀ + b + s·S Qᵀ (extra K-chunk). Backward: G, dQ (dy read twice);
  dP (x_a read); one GEMM dx = dy W + s·G Pᵀ. Extra ≈ 4 X.
* onepass: the fused forward; backward: one pass over dy for G and dQ (fp32 partials), the dx GEMM also reading
  x_a's tiles for dP's row-block partials (no pass of its own over x_a). Extra ≈ 2 X + workspaces.

Device figures (dense, no sparsity; spec sheets):
  H100 SXM5 80 GB: HBM3 3.35 TB/s, bf16/fp16 989 TFLOP/s, fp32 67 TFLOP/s — NVIDIA H100 Tensor Core GPU datasheet.
  H200 SXM 141 GB: HBM3e 4.8 TB/s, bf16/fp16 989 TFLOP/s, fp32 67 TFLOP/s — NVIDIA H200 Tensor Core GPU datasheet.
  A100 SXM4 80 GB: HBM2e 2.039 TB/s, bf16/fp16 312 TFLOP/s, fp32 19.5 TFLOP/s — NVIDIA A100 Tensor Core GPU
  datasheet.
η_mem = 0.9 and η_gemm = 0.8 are modelling assumptions (the fractions of those peaks that streaming kernels and
large GEMMs commonly reach), not measurements; :func:`floor` takes others. With η_mem = η_gemm = 1 the ratios
of the memory-bound launches grow (bytes weigh more against FLOPs); both are printed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

DEVICES = {  # name: (HBM bytes/s, dense 16-bit tensor-core FLOP/s, fp32 FLOP/s, SM count), sources above
    "H100": (3.35e12, 989e12, 67e12, 132),
    "H200": (4.8e12, 989e12, 67e12, 132),
    "A100": (2.039e12, 312e12, 19.5e12, 108),
}
ETA_MEM = 0.9
ETA_GEMM = 0.8
ROUTES = ("split", "fused", "onepass")
TARGET = (8192, 4096, 4096, 16)  # (T, d_in, d_out, r): the speed goal's shape, bf16
SHAPES = (TARGET, (2048, 4096, 4096, 16), (8192, 4096, 11008, 16), (512, 1024, 1024, 8))
FOLD_BLOCK_M = 128  # the onepass dx GEMM's row block (kernels/launch.py): one dP partial per block


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the model: what it computes, bytes through HBM, FLOPs, whether its FLOPs run on
    tensor cores (16-bit operands) or fp32 units."""
    what: str
    bytes: float
    flops: float
    tensor_cores: bool = True

    def seconds(self, device: str, eta_mem: float = ETA_MEM, eta_gemm: float = ETA_GEMM) -> float:
        bandwidth, peak16, peak32, _ = DEVICES[device]
        peak = peak16 if self.tensor_cores else peak32
        return max(self.bytes / (eta_mem * bandwidth), self.flops / (eta_gemm * peak))


def _gemm(what, M, N, K, e, extra_bytes=0.0, extra_flops=0.0, tensor_cores=True) -> Launch:
    """C (M, N) = A (M, K) B (K, N) in element size ``e``: reads A and B, writes C."""
    return Launch(what, e * (M * K + K * N + M * N) + extra_bytes, 2.0 * M * N * K + extra_flops, tensor_cores)


def dy_pass_programs(T: int, d_out: int, sm_count: int) -> tuple[int, int]:
    """(n_i, n_j) of the onepass dy pass, as kernels/tail_adapter_onepass.py::dy_pass_grid chooses them."""
    n_j = max(1, min(math.ceil(d_out / 128), round(math.sqrt(sm_count * d_out / max(T, 1)))))
    n_i = max(1, min(math.ceil(T / 64), math.ceil(sm_count / n_j)))
    return n_i, n_j


def frozen_layer(T, d_in, d_out, e=2) -> list[Launch]:
    """The reference: nn.Linear forward and its input-gradient backward (cuBLAS)."""
    return [_gemm("y = x W^T + b", T, d_out, d_in, e, e * d_out),
            _gemm("dx = dy W", T, d_in, d_out, e)]


def route_launches(route: str, T: int, d_in: int, d_out: int, r: int, frame: str = "head", e: int = 2,
                   frame_e: int = 4, sm_count: int = 132) -> list[Launch]:
    """Every launch of one layer step of ``route`` ("split" | "fused" | "onepass") in ``frame`` ("head" | "full"),
    activations of element size ``e``, frame (U, V) and factors of ``frame_e`` (float32)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {list(ROUTES)}, got {route!r}")
    if frame not in ("head", "full"):
        raise ValueError(f"frame must be 'head' or 'full', got {frame!r}")
    low = 2.0 * T * r  # FLOPs per unit of width of a rank-r product over T tokens
    launches = []
    if frame == "full":  # P = V Aᵀ, Q = U B (k = min(d_in, d_out)), one pair launch
        k = min(d_in, d_out)
        launches.append(Launch("P = V A^T, Q = U B", frame_e * ((d_in + d_out) * k + 2 * k * r) + e * (d_in + d_out) * r,
                               2.0 * (d_in + d_out) * k * r, frame_e == 2))
    S = _gemm("S = x_a P", T, r, d_in, e)
    if route == "split":
        launches += [S, _gemm("y = x W^T + b (cuBLAS)", T, d_out, d_in, e, e * d_out),
                     Launch("y += s S Q^T (cuBLAS)", e * (2 * T * d_out + T * r + d_out * r), low * d_out)]
    else:
        launches += [S, _gemm("y = x W^T + b + s S Q^T", T, d_out, d_in, e, e * (d_out + T * r + d_out * r),
                              low * d_out)]
    G_e = e if route == "split" else 4
    if route in ("split", "fused"):
        launches.append(Launch("G = dy Q, dQ = s dy^T S (dy read twice)",
                               e * (2 * T * d_out + d_out * r + T * r + d_out * r) + G_e * T * r, 2 * low * d_out))
        launches.append(Launch("dP = s x_a^T G", e * (T * d_in + d_in * r) + G_e * T * r, low * d_in))
        if route == "split":
            launches += [_gemm("dx = dy W (cuBLAS)", T, d_in, d_out, e),
                         Launch("dx += s G P^T (cuBLAS)", e * (2 * T * d_in + T * r + d_in * r), low * d_in)]
        else:
            launches.append(_gemm("dx = dy W + s G P^T", T, d_in, d_out, e, 4 * T * r + e * d_in * r, low * d_in))
    else:
        n_i, n_j = dy_pass_programs(T, d_out, sm_count)
        partials = 4 * r * (n_j * T + n_i * d_out)
        launches.append(Launch("G, dQ partials (one read of dy)", e * (T * d_out + T * r + d_out * r) + partials,
                               2 * low * d_out))
        launches.append(Launch("sum G and dQ partials", partials + 4 * T * r + e * d_out * r, 0.0, False))
        fold = 4.0 * math.ceil(T / FOLD_BLOCK_M) * d_in * r
        launches.append(_gemm("dx = dy W + s G P^T, dP partials (reads x_a)", T, d_in, d_out, e,
                              4 * T * r + e * d_in * r + e * T * d_in + fold, 2 * low * d_in))
        launches.append(Launch("sum dP partials", fold + e * d_in * r, 0.0, False))
    if frame == "full":  # dA = dPᵀ V, dB = Uᵀ dQ
        k = min(d_in, d_out)
        launches.append(Launch("dA = dP^T V, dB = U^T dQ", frame_e * ((d_in + d_out) * k + 2 * k * r)
                               + e * (d_in + d_out) * r, 2.0 * (d_in + d_out) * k * r, frame_e == 2))
    return launches


def total_bytes(launches) -> float:
    return sum(launch.bytes for launch in launches)


def total_flops(launches) -> float:
    return sum(launch.flops for launch in launches)


def floor(route: str, shape=TARGET, device: str = "H200", frame: str = "head", eta_mem: float = ETA_MEM,
          eta_gemm: float = ETA_GEMM) -> float:
    """The modelled floor: ``route``'s time over the frozen layer's, at ``shape`` = (T, d_in, d_out, r), bf16."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    T, d_in, d_out, r = shape
    sm = DEVICES[device][3]
    ours = sum(k.seconds(device, eta_mem, eta_gemm) for k in route_launches(route, T, d_in, d_out, r, frame,
                                                                           sm_count=sm))
    base = sum(k.seconds(device, eta_mem, eta_gemm) for k in frozen_layer(T, d_in, d_out))
    return ours / base


def table(device: str = "H200", shapes=SHAPES, measured: Optional[dict] = None) -> list[dict]:
    """One row per (shape, frame, route): extra bytes and FLOPs over the frozen layer, the floor (assumed
    efficiencies and spec peaks), the measured ratio from ``measured`` {(route, frame, shape): ratio} or None."""
    from ..backends.onepass import large_step
    measured = measured or {}
    rows = []
    for shape in shapes:
        T, d_in, d_out, r = shape
        base = frozen_layer(T, d_in, d_out)
        auto = "onepass" if large_step(T, d_in * d_out, r) else "split"
        for frame in ("head", "full"):
            for route in ROUTES:
                launches = route_launches(route, T, d_in, d_out, r, frame, sm_count=DEVICES[device][3])
                rows.append({"shape": shape, "frame": frame, "route": route, "auto": route == auto,
                             "launches": len(launches),
                             "extra_MB": (total_bytes(launches) - total_bytes(base)) / 1e6,
                             "extra_GFLOP": (total_flops(launches) - total_flops(base)) / 1e9,
                             "floor": floor(route, shape, device, frame),
                             "floor_peak": floor(route, shape, device, frame, 1.0, 1.0),
                             "measured": measured.get((route, frame, shape))})
    return rows


def render(device: str = "H200", shapes=SHAPES, measured: Optional[dict] = None) -> str:
    """The table of :func:`table` as text (``taillor bench --roofline``)."""
    bandwidth, peak16, _, sm = DEVICES[device]
    lines = [f"Roofline floor of fwd + dx-bwd against the frozen nn.Linear, bf16, on {device} "
             f"({bandwidth / 1e12:.3g} TB/s, {peak16 / 1e12:.0f} TFLOP/s dense 16-bit, {sm} SMs; "
             f"eta_mem {ETA_MEM}, eta_gemm {ETA_GEMM} assumed; 'at peak': both 1).",
             "A model, not a measurement: launch latency and the Triton-vs-cuBLAS GEMM gap come on top.",
             "shape (T x d_in x d_out, r)   frame  route    launches  extra MB  extra GFLOP  floor   at peak  measured"]
    for row in table(device, shapes, measured):
        T, d_in, d_out, r = row["shape"]
        route = row["route"] + ("*" if row["auto"] else "")
        measured_text = "not measured" if row["measured"] is None else f"{row['measured']:.3f}x"
        lines.append(f"{T} x {d_in} x {d_out}, r {r:<4}".ljust(30) + f"{row['frame']:<7}{route:<9}"
                     f"{row['launches']:>8}  {row['extra_MB']:>8.1f}  {row['extra_GFLOP']:>11.2f}  "
                     f"{row['floor']:.3f}x  {row['floor_peak']:.3f}x  {measured_text}")
    lines.append("* the route TAILLOR_ADAPTER_IMPL=auto takes at that shape (taillor/backends/onepass.py).")
    return "\n".join(lines)
