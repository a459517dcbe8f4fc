"""The command line of the causal-LM demo: ``taillor demo --model smollm2 [--quick] ...``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Union

from .llm import DEFAULT, QUICK, TARGETS, run_llm_demo, taillor_overrides
from .llm_methods import METHODS
from .peers import PEERS

__all__ = ["build_parser", "main"]


def _head_value(text: str) -> Union[int, float]:
    return float(text) if any(c in text for c in ".eE") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taillor demo --model smollm2", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small run: 1 seed, {QUICK.steps} steps/task of "
                   f"{QUICK.batch_size * QUICK.grad_accum}×{QUICK.block_tokens} tokens")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds (default {DEFAULT.seeds}, {QUICK.seeds} with "
                                                          "--quick); tables show mean ± std")
    p.add_argument("--out", default=None, help="output folder (default runs/llm-<timestamp>/)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)}, or 'all' (default: all; with --quick "
                        "TailLoR, LoRA and frozen)")
    p.add_argument("--lr-grid", action="store_true",
                   help="run each method of --methods (default: the peers) over its learning-rate grid, one seed, "
                        "and write lr-grid.md (use with --quick for the quick settings)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    p.add_argument("--lr", type=float, default=None, help=f"adapter learning rate, TailLoR and LoRA (default "
                                                         f"{DEFAULT.lr:g})")
    p.add_argument("--lr-full", type=float, default=None, help=f"full fine-tuning learning rate (default "
                                                              f"{DEFAULT.lr_full:g})")
    p.add_argument("--head", type=_head_value, default=None,
                   help="TailLoR head: an int count or a float fraction (default: TailLoRConfig's)")
    p.add_argument("--penalty", type=float, default=None, help="TailLoR penalty (default: TailLoRConfig's)")
    p.add_argument("--head-share-target", type=float, default=None,
                   help="TailLoR target head share of ||ΔW||² (default: TailLoRConfig's)")
    p.add_argument("--rank", type=int, default=None, help=f"adapter rank (default {DEFAULT.rank})")
    p.add_argument("--targets", default=None, help=f"comma-separated target modules (default {','.join(TARGETS)})")
    p.add_argument("--bf16", action="store_true", help="train under CPU bf16 autocast (slower without AMX)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes running methods side by side, one torch thread each (default {DEFAULT.workers})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the main process (the set-up, and every method with --workers 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataUnavailable

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = QUICK if args.quick else DEFAULT
    overrides: dict = {}
    if args.seeds is not None:
        if args.seeds < 1:
            print(f"taillor demo: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
            return 2
        overrides["seeds"] = args.seeds
    if args.methods:
        methods = METHODS if args.methods.strip() == "all" else tuple(
            m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            print(f"taillor demo: unknown method(s) {bad}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
        overrides["methods"] = methods
    if args.targets:
        overrides["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    for key in ("steps", "lr", "lr_full", "head", "penalty", "head_share_target", "rank"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.bf16:
        overrides["bf16"] = True
    if args.workers is not None:
        if args.workers < 1:
            print(f"taillor demo: --workers must be >= 1, got {args.workers}", file=sys.stderr)
            return 2
        overrides["workers"] = args.workers
    settings = replace(settings, **overrides)
    try:  # a bad head, penalty or target fails here, before anything is loaded
        import taillor

        taillor.TailLoRConfig(**taillor_overrides(settings))
    except (TypeError, ValueError) as e:
        print(f"taillor demo: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", time.strftime("llm-%Y%m%d-%H%M%S"))
    try:
        if args.lr_grid:
            from .llm_grid import run_lr_grid

            grid_methods = [m for m in (settings.methods if args.methods else PEERS) if m != "frozen"]
            run_lr_grid(settings, grid_methods, out)
            return 0
        run_llm_demo(settings, out)
    except DataUnavailable as e:
        print(f"taillor demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
