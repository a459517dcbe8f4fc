"""``taillor bench``: TailLoRLinear against nn.Linear (the floor) and PEFT LoRA (the peer), randomized SVD, penalty
and frame building, printed as tables of ratios and written as bench.json and bench.md.

Four comparisons, each measured in one run (see :mod:`taillor.bench.measurement`): adapter, svd, penalty, frames.
``--fast`` (or ``TAILLOR_BENCH_FAST=1``) shrinks every case to toy sizes and one round: for CI, so no benchmark
rots; its numbers mean nothing. ``--roofline [H100|H200|A100]`` prints the byte and FLOP model of every adapter
route instead (:mod:`taillor.bench.roofline`; no measurement, no device needed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Optional

import torch

from .measurement import measure_adapter, measure_frames, measure_penalty, measure_svd
from .memory import MEMORY_BASES, MEMORY_METHODS, MEMORY_SHAPES, measure_memory, memory_choice, memory_shapes
from .methods import METHODS, ROUTE_METHODS
from .shapes import (adapter_shapes, fast_mode, frames_models, penalty_cases, rounds_for, speed_targets,
                     svd_cases)
from .tables import format_checks, format_markdown, format_text, machine_info, target_checks


SUITES = ("adapter", "svd", "penalty", "frames", "memory")
# The memory suite runs a fresh process per row (minutes): only when asked for with --suites.
DEFAULT_SUITES = ("adapter", "svd", "penalty", "frames")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="taillor bench",
        description="TailLoRLinear vs nn.Linear (the floor) and PEFT LoRA (the peer); randomized SVD, penalty and "
                    "frame building. Prints ratio tables and writes bench.json and bench.md.")
    parser.add_argument("--quick", action="store_true", help="speed-target cases only (and fewer rounds on CUDA)")
    parser.add_argument("--speed-target", action="store_true",
                        help="adapter suite on the device's speed-target shape only, in both frames")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None,
                        help="output folder (bench.json, bench.md) or a .json path; default runs/bench-<timestamp>/")
    parser.add_argument("--suites", default=None,
                        help=f"comma-separated subset of {','.join(SUITES)} (default: all but memory; --quick on "
                             "the CPU: adapter,svd,penalty)")
    parser.add_argument("--methods", default=",".join(METHODS), help="adapter methods to run (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per comparison")
    parser.add_argument("--full-frames", action="store_true",
                        help="frames suite on all 16 layers of the 1B shapes (CPU; slow)")
    parser.add_argument("--memory-shapes", default=None,
                        help=f"memory suite: comma-separated subset of {','.join(MEMORY_SHAPES)} (default: "
                             "smollm2-135m; toy with --fast)")
    parser.add_argument("--memory-bases", default=",".join(MEMORY_BASES), help="memory suite: bases to measure")
    parser.add_argument("--memory-methods", default=",".join(MEMORY_METHODS), help="memory suite: methods to measure")
    parser.add_argument("--fast", action="store_true", help="toy sizes, one round (CI; same as TAILLOR_BENCH_FAST=1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's; on a loaded CPU, 1 thread avoids "
                             "waiting for a descheduled worker thread inside every op)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--roofline", nargs="?", const="H200", default=None, metavar="GPU",
                        help="print each adapter route's modelled bytes, FLOPs and floor ratio against the frozen "
                             "layer on GPU (H100, H200 or A100; default H200) and exit")
    return parser.parse_args(argv)


def _output_paths(out: Optional[str]) -> tuple[str, str]:
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"bench-{stamp}")
    if out.endswith(".json"):
        return out, out[:-5] + ".md"
    return os.path.join(out, "bench.json"), os.path.join(out, "bench.md")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    if args.roofline is not None:
        from .roofline import DEVICES, render
        if args.roofline not in DEVICES:
            print(f"taillor bench: --roofline takes one of {sorted(DEVICES)}, got {args.roofline!r}", file=sys.stderr)
            return 2
        print(render(args.roofline))  # no GPU run feeds it here: every measured column says "not measured"
        return 0
    if args.fast:
        os.environ["TAILLOR_BENCH_FAST"] = "1"
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        print("taillor bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    if args.threads is not None:
        if args.threads < 1:
            print("taillor bench: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.suites:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    elif args.quick and device.type == "cpu" and not fast_mode():
        suites = ["adapter", "svd", "penalty"]
    else:
        suites = list(DEFAULT_SUITES)
    unknown = sorted(set(suites) - set(SUITES))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown += sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"taillor bench: unknown suite or method {unknown}; suites: {list(SUITES)}, methods: {list(METHODS)}",
              file=sys.stderr)
        return 2
    try:
        memory_plan = (memory_choice(args.memory_shapes, MEMORY_SHAPES, "shape") if args.memory_shapes
                       else memory_shapes())
        memory_bases = memory_choice(args.memory_bases, MEMORY_BASES, "base")
        memory_methods = memory_choice(args.memory_methods, MEMORY_METHODS, "method")
    except ValueError as error:
        print(f"taillor bench: {error}", file=sys.stderr)
        return 2
    warmup, rounds = rounds_for(device.type, args.quick)
    if args.rounds is not None:
        rounds = max(1, args.rounds)
    svd_rounds = max(1, min(rounds // 2, 7))  # each round runs the exact SVD too
    json_path, md_path = _output_paths(args.out)

    plan: list[tuple[str, object, int]] = []  # (suite, case, progress units)
    if "adapter" in suites:
        n_methods = len([m for m in methods if m not in ROUTE_METHODS or device.type == "cuda"])
        shapes = adapter_shapes(device.type, args.quick)
        if args.speed_target and not fast_mode():
            shapes = speed_targets(device.type)
        plan += [("adapter", s, 1 + rounds * n_methods) for s in shapes]
    if "svd" in suites:
        plan += [("svd", c, svd_rounds * 3) for c in svd_cases(device.type, args.quick)]
    if "penalty" in suites:
        plan += [("penalty", c, rounds * 2) for c in penalty_cases(device.type, args.quick)]
    if "frames" in suites:
        plan += [("frames", m, 3) for m in frames_models(device.type, args.quick, args.full_frames)]
    if "memory" in suites:
        plan += [("memory", shape, len(memory_bases) * len(memory_methods)) for shape in memory_plan]

    from tqdm.auto import tqdm
    bar = tqdm(total=sum(p[2] for p in plan), desc="taillor bench", unit="step", disable=args.no_progress,
               file=sys.stderr)

    def tick(extra: int) -> None:
        bar.update(1 + extra)

    rows: list[dict] = []
    started = time.perf_counter()
    meta = machine_info(device)
    meta["command"] = "taillor bench " + " ".join(sys.argv[1:] if argv is None else list(argv))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)

    def write(complete: bool) -> list[dict]:
        """Write bench.json and bench.md (after every case too, so a run cut short keeps what it measured)."""
        meta["complete"] = complete
        meta["seconds"] = round(time.perf_counter() - started, 1)
        try:
            meta["loadavg_after"] = list(os.getloadavg())
        except OSError:
            pass
        checks = target_checks(rows)
        with open(json_path + ".tmp", "w") as f:  # atomic: a run stopped mid-write keeps the previous file
            json.dump({"meta": meta, "rows": rows, "targets": checks}, f, indent=2)
        os.replace(json_path + ".tmp", json_path)
        with open(md_path, "w") as f:
            f.write(format_markdown(rows))
            if checks:
                f.write("\n" + format_checks(checks, markdown=True))
        return checks

    done = 0
    for suite, case, units in plan:
        bar.set_postfix_str(f"{suite}: {getattr(case, 'name', case)}"[:60])
        if suite == "adapter":
            rows += measure_adapter(case, device, methods, warmup, rounds, tick)
        elif suite == "svd":
            rows += measure_svd(case, device, 1 if warmup else 0, svd_rounds, tick)
        elif suite == "penalty":
            rows += measure_penalty(case, device, 1 if warmup else 0, rounds, tick)
        elif suite == "memory":
            rows += measure_memory(case, memory_bases, memory_methods, tick=tick)
        else:  # each row written as soon as it is measured: a frames run cut short keeps its rows
            measure_frames(case, device, 1, tick, emit=lambda row: (rows.append(row), write(complete=False)))
        write(complete=False)
        done += units
        bar.n = done
        bar.refresh()
    bar.close()
    checks = write(complete=True)
    print(f"\ntaillor bench on {meta['device']} ({meta.get('gpu', meta['cpu'])}), torch {meta['torch']}, "
          f"{meta['torch_threads']} thread(s), {meta['seconds']} s" + (" — FAST MODE: toy sizes, the numbers mean nothing" if fast_mode() else ""))
    if device.type == "cpu" and "adapter" in suites:
        print("peak MB on the CPU = bytes saved for backward (activations; parameters and input excluded)")
    print(format_text(rows))
    if checks and not fast_mode():
        print(format_checks(checks))
    print(f"wrote {json_path} and {md_path}")
    return 0

