"""The ``taillor`` command: info, demo, bench, check-kernels."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .info import info
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0


def _demo_model(rest: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--model NAME`` (or ``--model=NAME``) out of the demo's arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    known, others = parser.parse_known_args(rest)
    return known.model, others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taillor", description="TailLoR continual fine-tuning toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, backends, CUDA extension status")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("demo", help="continual-learning demo: TailLoR vs LoRA vs full fine-tuning (--model smollm2: "
                                "the causal-LM demo)", add_help=False)
    sub.add_parser("bench", help="benchmark TailLoRLinear against nn.Linear and PEFT LoRA", add_help=False)
    sub.add_parser("check-kernels", help="compile every Triton kernel ahead of time, no GPU needed",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _info(args)
    if args.command == "demo":
        model, rest = _demo_model(rest)
        if model == "smollm2":
            from .demo.llm_cli import main as llm_demo_main
            return llm_demo_main(rest)
        if model not in (None, "minilm"):
            print(f"taillor demo: unknown --model {model!r}; choose minilm (the default) or smollm2", file=sys.stderr)
            return 2
        from .demo.run import main as demo_main
        return demo_main(rest)
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    from .check_kernels import main as check_main
    return check_main(rest)


if __name__ == "__main__":
    sys.exit(main())
