"""Sweep TailLoR's head size and penalty on the demo (taillor.demo) to choose TailLoRConfig's defaults.

For every (head, penalty) pair, TailLoR (full frame) runs the demo's task sequence (fortunes -> language ->
stdlib on all-MiniLM-L6-v2) with the demo's settings; LoRA merged-and-restarted after each task (the same
consolidation without frame and penalty) runs once per seed as the reference. Reported per configuration
(mean over seeds): average accuracy ACC, backward transfer BWT, final docstring->code retrieval R@1 (the
pre-trained skill), final cosine similarity to the base model's embeddings.

    python benchmarks/sweep_defaults.py --quick --out runs/sweep          # ~1 min per configuration on 2 cores
    python benchmarks/sweep_defaults.py --heads 0.05,0.1,0.25 --penalties 0,1e-3,1e-2,1e-1,1 --seeds 2

Writes sweep.json, sweep.png (ACC and R@1 over the grid, and the accuracy/retention trade-off) and prints a
table. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo's --quick settings (default: its full settings)")
    p.add_argument("--heads", type=_floats, default=[0.05, 0.1, 0.25])
    p.add_argument("--penalties", type=_floats, default=[0.0, 1e-3, 1e-2, 1e-1, 1.0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="steps per task (default: the demo's)")
    p.add_argument("--frame", choices=["full", "head"], default="full")
    p.add_argument("--out", default=os.path.join("runs", time.strftime("sweep-%Y%m%d-%H%M%S")))
    p.add_argument("--replot", metavar="SWEEP_JSON", help="only redraw the figure of an earlier sweep.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
        heads = sorted({e["head"] for e in results["grid"]})
        penalties = sorted({e["penalty"] for e in results["grid"]})
        print(plot(results, heads, penalties, os.path.join(os.path.dirname(args.replot), "sweep.png")))
        return 0

    from taillor.demo.run import DEFAULT, QUICK, _run_method, prepare

    settings = QUICK if args.quick else DEFAULT
    settings = replace(settings, seeds=args.seeds, **({"steps": args.steps} if args.steps else {}))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    ctx = prepare(settings)
    common = (ctx["model"], ctx["tokenizer"], ctx["tasks"], ctx["retrieval"], ctx["base_emb"], ctx["base_values"])
    method = f"taillor-{args.frame}"

    def run(name, s, seed):
        res, _ = _run_method(name, *common, s, seed, log=lambda msg: None)
        return {"acc": res["metrics"]["acc"], "bwt": res["metrics"]["bwt"],
                "forgetting": res["metrics"]["forgetting"], "r1": res["probes"]["retrieval_r1"][-1],
                "cos": res["probes"]["cosine_to_base"][-1], "R": res["R"], "wall": res["wall_seconds"],
                "penalty_last": [i["penalty_last"] for i in res["train_info"]]}

    def mean(rows, key):
        return statistics.fmean(r[key] for r in rows)

    results = {"settings": asdict(settings), "method": method, "base_r1": ctx["base_values"]["retrieval_r1"],
               "reference": {}, "grid": []}
    ref = [run("lora-merged", settings, seed) for seed in range(args.seeds)]
    results["reference"] = {"method": "lora-merged", "runs": ref,
                            **{k: mean(ref, k) for k in ("acc", "bwt", "forgetting", "r1", "cos")}}
    print(f"reference lora-merged: ACC {results['reference']['acc']:.3f} BWT {results['reference']['bwt']:+.3f} "
          f"R@1 {results['reference']['r1']:.3f} cos {results['reference']['cos']:.3f}", flush=True)
    for head in args.heads:
        for pen in args.penalties:
            s = replace(settings, head=head, penalty=pen)
            rows = [run(method, s, seed) for seed in range(args.seeds)]
            entry = {"head": head, "penalty": pen, "runs": rows,
                     **{k: mean(rows, k) for k in ("acc", "bwt", "forgetting", "r1", "cos")}}
            results["grid"].append(entry)
            print(f"head {head:<5g} penalty {pen:<7g} ACC {entry['acc']:.3f} BWT {entry['bwt']:+.3f} "
                  f"R@1 {entry['r1']:.3f} cos {entry['cos']:.4f} (penalty at end {rows[0]['penalty_last']}, "
                  f"{rows[0]['wall']:.0f}s)", flush=True)
    results["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    path = plot(results, args.heads, args.penalties, os.path.join(args.out, "sweep.png"))
    print(f"wrote {os.path.join(args.out, 'sweep.json')} and {path} ({results['wall_seconds']:.0f}s)")
    return 0


def plot(results: dict, heads: list[float], penalties: list[float], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = {(e["head"], e["penalty"]): e for e in results["grid"]}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, label in ((axes[0], "acc", "average accuracy ACC"),
                           (axes[1], "cos", "final cosine similarity to base embeddings")):
        M = np.array([[grid[(h, p)][key] for p in penalties] for h in heads])
        im = ax.imshow(M, cmap="viridis", aspect="auto")
        for i in range(len(heads)):
            for j in range(len(penalties)):
                ax.text(j, i, f"{M[i, j]:.3f}" + (f"\nR@1 {grid[(heads[i], penalties[j])]['r1']:.2f}"
                                                   if key == "cos" else ""),
                        ha="center", va="center", fontsize=8, color="white" if M[i, j] < M.mean() else "black")
        ax.set_xticks(range(len(penalties)), [f"{p:g}" for p in penalties])
        ax.set_yticks(range(len(heads)), [f"{h:g}" for h in heads])
        ax.set_xlabel("penalty λ")
        ax.set_ylabel("head (fraction of spectrum)")
        ref = results["reference"][key]
        ax.set_title(f"{label}\n(LoRA merge+restart: {ref:.3f}"
                     + (f"; base R@1 {results['base_r1']:.2f})" if key == "cos" else ")"), fontsize=9)
        fig.colorbar(im, ax=ax)
    ax = axes[2]
    for h in heads:
        xs = [grid[(h, p)]["cos"] for p in penalties]
        ys = [grid[(h, p)]["acc"] for p in penalties]
        ax.plot(xs, ys, "-o", ms=4, label=f"head {h:g}")
        for x, y, p in zip(xs, ys, penalties):
            ax.annotate(f"{p:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.plot([results["reference"]["cos"]], [results["reference"]["acc"]], "k*", ms=10, label="LoRA merge+restart")
    ax.set_xlabel("final cosine to base embeddings (higher = less drift)")
    ax.set_ylabel("ACC (new tasks)")
    ax.set_title("trade-off (labels: λ)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"TailLoR ({results['method']}) head × penalty sweep on the demo, "
                 f"{results['settings']['steps']} steps/task, {results['settings']['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
