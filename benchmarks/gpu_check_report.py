"""RESULTS.md of benchmarks/gpu_check.sh: what ran, the measured tables, and a verdict table of every GPU goal.

usage: python benchmarks/gpu_check_report.py WORK_DIR RESULTS_MD [GPU_INFO] [START_EPOCH] [CAP_S]

WORK_DIR holds what the stages left: stages.tsv, info.log, tests.xml / ext_tests.xml (JUnit), speed.json and
frames.json (``taillor bench``). A goal whose input is missing is "not measured": no figure is written unless
a stage measured it. The verdict of a speed goal also requires the timed outputs to match eager (bench rows
carry a "check" field; a FAILED row fails its goals).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

from taillor.bench import GPU_SPEED_TARGET, METHOD_LABELS, format_markdown

SPEED_LIMIT = 1.10      # TailLoRLinear fwd+bwd / frozen nn.Linear
FRAMES_SECONDS = 2.0    # build_frames on the 7B shapes
FRAMES_SPEEDUP = 50.0   # over torch.linalg.svd
NOT_MEASURED = "not measured"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def junit_summary(path):
    """(passed, failed, skipped, [failed test names]) of a JUnit XML file, or None when it is missing."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    passed = failed = skipped = 0
    names = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
            names.append(case.get("name", "?"))
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, names


def _tests_goal(goal, summary):
    if summary is None or summary[0] + summary[1] == 0:
        return goal, NOT_MEASURED, NOT_MEASURED
    passed, failed, skipped, _ = summary
    figure = f"{passed} passed, {failed} failed, {skipped} skipped"
    return goal, figure, "met" if failed == 0 else "NOT met"


def _speed_row(rows, method):
    shape = GPU_SPEED_TARGET
    for r in rows:
        if (r.get("suite") == "adapter" and r.get("method") == method and r.get("tokens") == shape.tokens
                and r.get("d_in") == shape.d_in and r.get("d_out") == shape.d_out and r.get("rank") == shape.rank
                and r.get("dtype") == shape.dtype):
            return r
    return None


def speed_goals(rows):
    goals = []
    for method in ("taillor-fused", "taillor-split"):
        label = METHOD_LABELS[method]
        row = _speed_row(rows, method)
        if row is None or "skipped" in row or "ratio_fwd_bwd" not in row:
            why = f" ({row['skipped']})" if row and "skipped" in row else ""
            goals.append((f"{label}: outputs and gradients match eager", NOT_MEASURED + why, NOT_MEASURED))
            goals.append((f"{label}: fwd+bwd <= {SPEED_LIMIT:.2f}x frozen nn.Linear", NOT_MEASURED + why,
                          NOT_MEASURED))
            goals.append((f"{label}: faster than PEFT LoRA", NOT_MEASURED + why, NOT_MEASURED))
            continue
        check = row.get("check", "not checked")
        ok = check.startswith("ok")
        goals.append((f"{label}: outputs and gradients match eager", check.split(" (")[0] if ok else check[:160],
                      "met" if ok else "NOT met"))
        ratio = row["ratio_fwd_bwd"]
        goals.append((f"{label}: fwd+bwd <= {SPEED_LIMIT:.2f}x frozen nn.Linear",
                      f"{ratio:.3f}x ({row['fwd_bwd_ms']:.3f} ms)",
                      "met" if ok and ratio <= SPEED_LIMIT else "NOT met"))
        if "ratio_to_peft" in row:
            peer = row["ratio_to_peft"]
            goals.append((f"{label}: faster than PEFT LoRA", f"{peer:.3f}x PEFT's time",
                          "met" if ok and peer < 1.0 else "NOT met"))
        else:
            goals.append((f"{label}: faster than PEFT LoRA", NOT_MEASURED + " (no PEFT row)", NOT_MEASURED))
    return goals


def frames_goals(rows):
    ours = next((r for r in rows if r.get("suite") == "frames" and r.get("method") == "build_frames"
                 and r.get("shape") == "llama-7b"), None)
    exact = next((r for r in rows if r.get("suite") == "frames" and r.get("method") == "linalg.svd"
                  and r.get("shape") == "llama-7b"), None)
    size = "Llama-7B shapes, 224 matrices, head 256"
    if ours is None:
        return [(f"build_frames <= {FRAMES_SECONDS:g} s ({size})", NOT_MEASURED, NOT_MEASURED),
                (f"build_frames >= {FRAMES_SPEEDUP:g}x torch.linalg.svd", NOT_MEASURED, NOT_MEASURED)]
    goals = [(f"build_frames <= {FRAMES_SECONDS:g} s ({size})",
              f"{ours['s']:.2f} s (σ rel. error {ours['sigma_rel_error_layer0']:.1e})",
              "met" if ours["s"] <= FRAMES_SECONDS else "NOT met")]
    if exact is None:
        goals.append((f"build_frames >= {FRAMES_SPEEDUP:g}x torch.linalg.svd", NOT_MEASURED, NOT_MEASURED))
    else:
        speedup = exact["speedup_of_build_frames"]
        goals.append((f"build_frames >= {FRAMES_SPEEDUP:g}x torch.linalg.svd", f"{speedup:.1f}x",
                      "met" if speedup >= FRAMES_SPEEDUP else "NOT met"))
    return goals


def build(work, gpu_info="", start=None, cap=None):
    """The text of RESULTS.md for the stage outputs in ``work``."""
    lines = [f"## GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", ""]
    info_text = ""
    try:
        info_text = open(os.path.join(work, "info.log")).read()
        info = json.loads(info_text[info_text.index("{"):info_text.rindex("}") + 1])
    except (OSError, ValueError):
        info = {}
    lines.append(f"- GPU: {gpu_info or info.get('device', 'unknown')}")
    lines.append(f"- torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda', '?')}), triton "
                 f"{info.get('triton', '?')}, Python {info.get('python', '?')}; Triton kernels: "
                 f"{info.get('triton_kernels', '?')}; adapter route by default: {info.get('adapter_route', '?')}")
    if start is not None:
        lines.append(f"- `bash benchmarks/gpu_check.sh`: {int(time.time()) - int(start)} s of a {cap} s cap")
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    try:
        for row in open(os.path.join(work, "stages.tsv")).read().splitlines():
            name, status, took = (row.split("\t") + ["", ""])[:3]
            lines.append(f"| {name} | {status} | {took} |")
    except OSError:
        lines.append("| (no stage ran) | | |")
    lines.append("")
    tests = junit_summary(os.path.join(work, "tests.xml"))
    ext_tests = junit_summary(os.path.join(work, "ext_tests.xml"))
    for title, summary in (("Compiled-kernel tests", tests), ("CUDA extension tests", ext_tests)):
        if summary and summary[3]:
            lines.append(f"{title}, failed: " + ", ".join(summary[3][:20]) + ("" if len(summary[3]) <= 20 else ", …"))
    rows = []
    for name in ("speed.json", "frames.json"):
        data = _read_json(os.path.join(work, name))
        if data:
            rows += data.get("rows", [])
    if rows:
        lines += ["", format_markdown(rows)]
    verdict = [_tests_goal("compiled Triton kernels match the float64 oracle (every op, both routes)", tests)]
    verdict += speed_goals(rows)
    verdict.append(_tests_goal("CUDA extension (randomized SVD) tests", ext_tests))
    verdict += frames_goals(rows)
    lines += ["### Verdict", "", "| GPU goal | figure | verdict |", "|---|---|---|"]
    lines += [f"| {goal} | {figure} | {result} |" for goal, figure, result in verdict]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    work, results = argv[0], argv[1]
    gpu_info = argv[2] if len(argv) > 2 else ""
    start = argv[3] if len(argv) > 3 else None
    cap = argv[4] if len(argv) > 4 else None
    text = build(work, gpu_info, start, cap)
    with open(results, "w") as f:
        f.write(text)
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
