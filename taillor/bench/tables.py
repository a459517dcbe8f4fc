"""The rows of a benchmark run as tables (text and markdown), the targets they decide, and the machine they ran on."""
from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import asdict
from typing import Optional

import torch

from .memory import RANK, TOKENS, memory_table
from .methods import METHOD_LABELS, ROUTE_METHODS
from .shapes import (CPU_SPEED_LIMIT, GPU_SPEED_LIMIT, PENALTY_SPEED_TARGET, SVD_SPEED_TARGET, fast_mode,
                     speed_targets)


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def tables(rows: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{suite: (header, lines)} of the rows, ready to print or to write as markdown."""
    out: dict[str, tuple[list[str], list[list[str]]]] = {}
    adapter = [r for r in rows if r["suite"] == "adapter"]
    if adapter:
        header = ["shape", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "× floor fwd", "× floor bwd",
                  "× floor fwd+bwd", "× PEFT fwd+bwd", "peak MB", "vs eager"]
        lines = []
        for r in adapter:
            if "skipped" in r:
                lines.append([r["shape"], r["label"], "skipped: " + r["skipped"]] + [""] * (len(header) - 3))
                continue
            lines.append([r["shape"], r["label"], _fmt(r["fwd_ms"]), _fmt(r["bwd_ms"]), _fmt(r["fwd_bwd_ms"]),
                          _fmt(r.get("ratio_fwd")), _fmt(r.get("ratio_bwd")), _fmt(r.get("ratio_fwd_bwd")),
                          _fmt(r.get("ratio_to_peft"), ".3f"), _fmt(r["peak_mb"], ".1f"),
                          r.get("check", "—").split(" (")[0]])
        out["adapter"] = (header, lines)
    svd = [r for r in rows if r["suite"] == "svd"]
    if svd:
        header = ["case", "method", "ms", "× svd_lowrank", "speed-up vs linalg.svd", "σ rel. error (top-k)",
                  "max angle (rad)"]
        out["svd"] = (header, [[r["shape"], r["label"], _fmt(r["ms"]), _fmt(r["ratio_to_svd_lowrank"]),
                                _fmt(r["speedup_vs_linalg_svd"], ".1f"), _fmt(r["sigma_rel_error"], ".2e"),
                                _fmt(r["max_angle_rad"], ".2e")] for r in svd])
    pen = [r for r in rows if r["suite"] == "penalty"]
    if pen:
        header = ["case", "method", "fwd ms", "fwd+bwd ms", "× Gram", "rel. diff to naive"]
        out["penalty"] = (header, [[r["shape"], r["label"], _fmt(r["fwd_ms"], ".3f"), _fmt(r["fwd_bwd_ms"], ".3f"),
                                    _fmt(r["ratio_to_gram"], ".1f"), _fmt(r["rel_diff_to_naive"], ".1e")]
                                   for r in pen])
    frames = [r for r in rows if r["suite"] == "frames"]
    if frames:
        header = ["model", "matrices", "method", "s", "build_frames speed-up", "σ rel. error (layer 0)",
                  "max angle (rad, layer 0)"]
        out["frames"] = (header, [[f"{r['shape']} h={r['head']} p={r['oversample']} q={r['niter']}",
                                   str(r["matrices"]), r["label"], _fmt(r["s"], ".2f"),
                                   _fmt(r["speedup_of_build_frames"], ".2f"),
                                   _fmt(r["sigma_rel_error_layer0"], ".2e"),
                                   _fmt(r["max_angle_rad_layer0"], ".2e")] for r in frames])
    if any(r["suite"] == "memory" for r in rows):
        out["memory"] = memory_table(rows)
    return out


TITLES = {"adapter": "Adapter layer: forward / backward / both, ratio to the frozen nn.Linear",
          "svd": "Randomized SVD", "penalty": "Spectral penalty: Gram form vs materializing ΔW (forward+backward)",
          "frames": "Frames for every target layer (head mode)",
          "memory": f"Host memory (resident set, fresh process per row) of applying the adapter and of one AdamW "
                    f"step ({TOKENS} tokens), rank {RANK}, all-linear"}


def format_text(rows: list[dict]) -> str:
    parts = []
    for suite, (header, lines) in tables(rows).items():
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        sep = "-+-".join("-" * w for w in widths)
        parts.append(TITLES[suite])
        parts.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
        parts.append(sep)
        for line in lines:
            parts.append(" | ".join(c.ljust(w) for c, w in zip(line, widths)))
        parts.append("")
    return "\n".join(parts)


def format_markdown(rows: list[dict]) -> str:
    parts = []
    for suite, (header, lines) in tables(rows).items():
        parts.append(f"### {TITLES[suite]}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            parts.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
        parts.append("")
    return "\n".join(parts)


def _find(rows: list[dict], suite: str, method: str, **fields) -> Optional[dict]:
    for r in rows:
        if r["suite"] == suite and r["method"] == method and "skipped" not in r and \
                all(r.get(k) == v for k, v in fields.items()):
            return r
    return None


def case_fields(case) -> dict:
    """The fields that identify a case in the rows (its note is a label, not an identity)."""
    return {k: v for k, v in asdict(case).items() if k != "note"}


def target_checks(rows: list[dict]) -> list[dict]:
    """The speed and accuracy targets these rows can decide: [{item, measured, target, met}]."""
    checks = []

    def add(item, measured, target, met):
        checks.append({"item": item, "measured": measured, "target": target, "met": bool(met)})

    speed_goals = [(shape, "taillor-eager", CPU_SPEED_LIMIT) for shape in speed_targets("cpu")]
    speed_goals += [(shape, method, GPU_SPEED_LIMIT) for shape in speed_targets("cuda") for method in ROUTE_METHODS]
    for shape, method, limit in speed_goals:
        key = case_fields(shape)
        ours, peft = _find(rows, "adapter", method, **key), _find(rows, "adapter", "peft", **key)
        label = f"{shape.note}: {METHOD_LABELS[method]}"
        if ours and ours.get("check", "ok").startswith("FAILED"):
            add(f"{label} outputs match eager, {shape.name}", ours["check"][:120], "match", False)
        elif ours and "ratio_fwd_bwd" in ours:
            add(f"{label} fwd+bwd / nn.Linear, {shape.name}",
                f"{ours['ratio_fwd_bwd']:.2f}x", f"<= {limit:.2f}x", ours["ratio_fwd_bwd"] <= limit)
            if peft and "ratio_to_peft" in ours:
                add(f"{label} faster than PEFT LoRA, {shape.name}",
                    f"{ours['ratio_to_peft']:.3f}x PEFT's time (PEFT {peft['ratio_fwd_bwd']:.2f}x floor)",
                    "< 1.000x", ours["ratio_to_peft"] < 1.0)
    ours = _find(rows, "svd", "taillor", **case_fields(SVD_SPEED_TARGET))
    low = _find(rows, "svd", "svd_lowrank", **case_fields(SVD_SPEED_TARGET))
    if ours and low:
        case = SVD_SPEED_TARGET.name
        add(f"randomized_svd time / svd_lowrank (same sketch), {case}",
            f"{ours['ratio_to_svd_lowrank']:.2f}x", "<= 1.00x", ours["ratio_to_svd_lowrank"] <= 1.0)
        add(f"randomized_svd σ error vs svd_lowrank's, {case}",
            f"{ours['sigma_rel_error']:.2e} vs {low['sigma_rel_error']:.2e}", "no worse",
            ours["sigma_rel_error"] <= low["sigma_rel_error"])
        add(f"randomized_svd speed-up over torch.linalg.svd, {case}", f"{ours['speedup_vs_linalg_svd']:.1f}x",
            ">= 10x", ours["speedup_vs_linalg_svd"] >= 10)
    naive = _find(rows, "penalty", "naive", **case_fields(PENALTY_SPEED_TARGET))
    if naive:
        add(f"penalty naive / Gram form (fwd+bwd), {PENALTY_SPEED_TARGET.name}", f"{naive['ratio_to_gram']:.1f}x",
            ">= 10x", naive["ratio_to_gram"] >= 10)
    for r in rows:
        if r["suite"] == "frames" and r["method"] == "build_frames" and r["shape"] == "llama-7b":
            low = _find(rows, "frames", "svd_lowrank", shape="llama-7b")
            exact = _find(rows, "frames", "linalg.svd", shape="llama-7b")
            add("build_frames, Llama-7B shapes (224 matrices, h=256)", f"{r['s']:.2f} s", "<= 2 s",
                r["s"] <= 2.0)
            if low:
                add("build_frames speed-up over a loop of svd_lowrank (errors: ours / loop)",
                    f"{low['speedup_of_build_frames']:.2f}x ({r['sigma_rel_error_layer0']:.1e} / "
                    f"{low['sigma_rel_error_layer0']:.1e})", ">= 2x at equal error",
                    low["speedup_of_build_frames"] >= 2 and r["sigma_rel_error_layer0"] <=
                    max(low["sigma_rel_error_layer0"], 1e-3))
            if exact:
                add("build_frames speed-up over torch.linalg.svd", f"{exact['speedup_of_build_frames']:.1f}x",
                    ">= 50x", exact["speedup_of_build_frames"] >= 50)
    return checks


def format_checks(checks: list[dict], markdown: bool = False) -> str:
    """The target checks as lines of text (or a markdown table)."""
    if not checks:
        return ""
    if markdown:
        lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {c['item']} | {c['measured']} | {c['target']} | {'yes' if c['met'] else '**no**'} |"
                  for c in checks]
        return "\n".join(lines) + "\n"
    return "\n".join(f"[{'met' if c['met'] else 'NOT MET'}] {c['item']}: {c['measured']} (target {c['target']})"
                     for c in checks) + "\n"


def machine_info(device: torch.device) -> dict:
    """Where a run happened: date, CPU/GPU, thread count, versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        triton_version = None
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": device.type, "fast_mode": fast_mode()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return info

