"""RESULTS.md of benchmarks/gpu_check.sh: what ran, the measured tables, and a verdict table of every GPU goal.

usage: python benchmarks/gpu_check_report.py WORK_DIR RESULTS_MD [GPU_INFO] [START_EPOCH] [CAP_S]

WORK_DIR holds what the stages left: stages.tsv (name, status, seconds), <stage>.log, tests.xml / ext_tests.xml
(JUnit), speed.json and frames.json (``taillor bench``), ext_info.log (``taillor info --json`` after the build).

A verdict is "met" only when it was measured in full: its stage ended "ok", every test it collected ran, and the
figure is within the goal. A stage that timed out, failed to start, or ran fewer tests than it collected gives
"not measured" (or "NOT met" where a failure was observed); a failed extension build gives "NOT met" for the build
and "not measured" for everything that needs the extension. The goals are README's: adapter fwd+bwd <= 1.07x a
frozen nn.Linear (bf16, 8192 tokens, 4096x4096, r 16; every route, in the head frame and in the full frame),
build_frames on the Llama-7B shapes <= 2 s and >= 50x torch.linalg.svd.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

FRAMES_SECONDS = 2.0    # build_frames on the 7B shapes
FRAMES_SPEEDUP = 50.0   # over torch.linalg.svd
NOT_MEASURED = "not measured"
MET, NOT_MET = "met", "NOT met"


# ---- stage outcomes ----------------------------------------------------------------------------------------------

def read_stages(work: str) -> dict[str, tuple[str, str]]:
    """{stage: (status, seconds)} from stages.tsv (empty when missing)."""
    stages = {}
    try:
        for row in open(os.path.join(work, "stages.tsv")).read().splitlines():
            name, status, took = (row.split("\t") + ["", ""])[:3]
            stages[name] = (status, took)
    except OSError:
        pass
    return stages


def stage_ok(stages: dict, name: str) -> bool:
    return stages.get(name, ("missing", ""))[0] == "ok"


def stage_problem(stages: dict, name: str) -> str:
    """Why stage ``name`` cannot vouch for a verdict ("" when it ended ok)."""
    status = stages.get(name, ("did not run", ""))[0]
    return "" if status == "ok" else f"stage {name}: {status}"


def gated(goal: str, figure: str, verdict: str, problem: str) -> tuple[str, str, str]:
    """A "met" verdict stands only when the stage that measured it has no problem; otherwise "not measured"."""
    if verdict == MET and problem:
        return goal, f"{figure} ({problem})", NOT_MEASURED
    return goal, figure, verdict


# ---- tests -------------------------------------------------------------------------------------------------------

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


def junit_properties(path) -> list[tuple[str, str, str]]:
    """(test, name, value) of every record_property of a JUnit XML file (figures a test measured)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    return [(case.get("name", "?"), prop.get("name", "?"), prop.get("value", ""))
            for case in root.iter("testcase") for prop in case.iter("property")]


def collected_count(log_text: str):
    """The number of tests pytest selected to run, from its log (xdist: "N workers [K items]"; plain: "collected
    N items / D deselected / K selected" or "collected N items"), or None when the log does not say."""
    found = re.findall(r"\d+ workers? \[(\d+) items?\]", log_text)
    if found:
        return int(found[-1])
    found = re.findall(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", log_text)
    if found:
        total, deselected, selected = found[-1]
        if selected:
            return int(selected)
        return int(total) - int(deselected or 0)
    return None


def tests_goal(goal: str, summary, collected, problem: str) -> tuple[str, str, str]:
    """The verdict of a test stage: NOT met on any failure; met only when every collected test ran and passed
    (none skipped) in a stage that ended ok; otherwise not measured."""
    if summary is None:
        return goal, NOT_MEASURED + (f" ({problem})" if problem else " (no JUnit XML)"), NOT_MEASURED
    passed, failed, skipped, _ = summary
    ran = passed + failed + skipped
    figure = f"{passed} passed, {failed} failed, {skipped} skipped of {collected if collected is not None else '?'}"
    if failed:
        return goal, figure, NOT_MET
    if collected is None:
        return goal, figure + " (collected count unknown)", NOT_MEASURED
    if ran < collected:
        return goal, figure + f" ({collected - ran} did not run)", NOT_MEASURED
    if skipped:
        return goal, figure + " (skipped tests were not measured)", NOT_MEASURED
    if passed == 0:
        return goal, figure, NOT_MEASURED
    return gated(goal, figure, MET, problem)


# ---- benchmark rows ----------------------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _speed_row(rows, method, shape):
    """The adapter row of ``method`` at ``shape`` (skipped rows too: their reason is the figure)."""
    from taillor.bench.tables import case_fields
    fields = case_fields(shape)
    return next((r for r in rows if r.get("suite") == "adapter" and r.get("method") == method
                 and all(r.get(k) == v for k, v in fields.items())), None)


def speed_goals(rows, problem: str = ""):
    """Per Triton route and frame (the speed target in the head frame, the default, and in the full frame): outputs
    match eager, fwd+bwd <= GPU_SPEED_LIMIT x nn.Linear, faster than PEFT."""
    from taillor.bench.methods import METHOD_LABELS, ROUTE_METHODS
    from taillor.bench.shapes import GPU_SPEED_LIMIT, speed_targets
    goals = []
    for shape in speed_targets("cuda"):
        for method in ROUTE_METHODS:
            label = f"{METHOD_LABELS[method]}, {shape.frame} frame"
            names = (f"{label}: outputs and gradients match eager", f"{label}: fwd+bwd <= {GPU_SPEED_LIMIT:.2f}x "
                     "frozen nn.Linear", f"{label}: faster than PEFT LoRA")
            row = _speed_row(rows, method, shape)
            if row is None or "skipped" in row or "ratio_fwd_bwd" not in row:
                why = row["skipped"] if row and "skipped" in row else (problem or "no row")
                goals += [(name, f"{NOT_MEASURED} ({why})", NOT_MEASURED) for name in names]
                continue
            check = row.get("check", "not checked")
            ok = check.startswith("ok")
            goals.append(gated(names[0], check.split(" (")[0] if ok else check[:160], MET if ok else NOT_MET,
                               problem))
            ratio = row["ratio_fwd_bwd"]
            host = f", host {row['host_ms']:.3f} ms/step to issue" if "host_ms" in row else ""
            goals.append(gated(names[1], f"{ratio:.3f}x ({row['fwd_bwd_ms']:.3f} ms{host})",
                               MET if ok and ratio <= GPU_SPEED_LIMIT else NOT_MET, problem))
            if "ratio_to_peft" in row:
                peer = row["ratio_to_peft"]
                goals.append(gated(names[2], f"{peer:.3f}x PEFT's time", MET if ok and peer < 1.0 else NOT_MET,
                                   problem))
            else:
                goals.append((names[2], NOT_MEASURED + " (no PEFT row)", NOT_MEASURED))
    return goals


def cost_model(rows, gpu_info: str) -> list[str]:
    """The roofline of every route and frame at the speed target (``taillor bench --roofline``) beside the measured
    fwd+bwd ratios: only bf16 rows whose outputs matched eager count (the model is of bf16 steps, and a wrong
    output's time says nothing). The model's device is the one named in ``gpu_info``, else none is drawn."""
    from taillor.bench import roofline
    from taillor.bench.methods import ROUTE_METHODS
    device = next((name for name in roofline.DEVICES if name in gpu_info.upper()), None)
    if device is None:
        return [f"No cost model for this GPU ({gpu_info or 'unknown'}): the roofline knows "
                f"{', '.join(roofline.DEVICES)}."]
    measured = {}
    for r in rows:
        if (r.get("suite") == "adapter" and r.get("method") in ROUTE_METHODS and r.get("dtype") == "bfloat16"
                and "ratio_fwd_bwd" in r and str(r.get("check", "")).startswith("ok")):
            shape = (r["tokens"], r["d_in"], r["d_out"], r["rank"])
            measured[(r["method"][len("taillor-"):], r.get("frame"), shape)] = r["ratio_fwd_bwd"]
    return ["```", roofline.render(device, shapes=(roofline.TARGET,), measured=measured), "```"]


def frames_goals(rows, problem: str = ""):
    """build_frames <= FRAMES_SECONDS (default precision, and with the TF32 range finder) and >= FRAMES_SPEEDUP x
    torch.linalg.svd, on the Llama-7B shapes."""
    def find(method):
        return next((r for r in rows if r.get("suite") == "frames" and r.get("method") == method
                     and r.get("shape") == "llama-7b"), None)
    size = "Llama-7B shapes, 224 matrices, head 256"
    why = f" ({problem})" if problem else ""
    goals = []
    for method, goal in (("build_frames", f"build_frames <= {FRAMES_SECONDS:g} s ({size})"),
                         ("build_frames-tf32", f"build_frames, TAILLOR_SVD_PRECISION=tf32, <= {FRAMES_SECONDS:g} s")):
        row = find(method)
        if row is None:
            goals.append((goal, NOT_MEASURED + (why or " (no row)"), NOT_MEASURED))
        else:
            goals.append(gated(goal, f"{row['s']:.2f} s (σ rel. error {row['sigma_rel_error_layer0']:.1e})",
                               MET if row["s"] <= FRAMES_SECONDS else NOT_MET, problem))
    exact = find("linalg.svd")
    goal = f"build_frames >= {FRAMES_SPEEDUP:g}x torch.linalg.svd"
    if exact is None or exact.get("speedup_of_build_frames") is None:
        goals.append((goal, NOT_MEASURED + (why or " (no row)"), NOT_MEASURED))
    else:
        speedup = exact["speedup_of_build_frames"]
        goals.append(gated(goal, f"{speedup:.1f}x", MET if speedup >= FRAMES_SPEEDUP else NOT_MET, problem))
    return goals


def extension_goal(stages: dict, work: str) -> tuple[str, str, str]:
    """The extension was built (TAILLOR_REQUIRE_CUDA_EXT=1) and `taillor info` reports it."""
    goal = "CUDA extension builds (TAILLOR_REQUIRE_CUDA_EXT=1) and taillor info reports it"
    if "ext_build" not in stages:
        return goal, NOT_MEASURED + " (no build ran)", NOT_MEASURED
    if not stage_ok(stages, "ext_build"):
        return goal, f"build {stages['ext_build'][0]} (see ext_build.log)", NOT_MET
    info = _info(os.path.join(work, "ext_info.log"))
    if info.get("cuda_extension") != "built":
        return goal, f"built, but taillor info says cuda_extension={info.get('cuda_extension', '?')}", NOT_MET
    return goal, "built and loaded", MET


def _info(path: str) -> dict:
    try:
        text = open(path).read()
        return json.loads(text[text.index("{"):text.rindex("}") + 1])
    except (OSError, ValueError):
        return {}


def verdicts(work: str) -> list[tuple[str, str, str]]:
    """Every GPU goal as (goal, figure, verdict), from what the stages left in ``work``."""
    stages = read_stages(work)

    def log(name):
        try:
            return open(os.path.join(work, f"{name}.log")).read()
        except OSError:
            return ""

    rows = []
    for name in ("speed.json", "frames.json"):
        rows += (_read_json(os.path.join(work, name)) or {}).get("rows", [])
    ext = extension_goal(stages, work)
    ext_problem = "" if ext[2] == MET else "extension not built"
    out = [tests_goal("compiled Triton kernels match the float64 oracle (every op, every route)",
                      junit_summary(os.path.join(work, "tests.xml")), collected_count(log("tests")),
                      stage_problem(stages, "tests"))]
    out += speed_goals(rows, stage_problem(stages, "speed"))
    out.append(ext)
    out.append(tests_goal("CUDA extension (randomized SVD) tests", junit_summary(os.path.join(work, "ext_tests.xml")),
                          collected_count(log("ext_tests")), ext_problem or stage_problem(stages, "ext_tests")))
    out += frames_goals(rows, ext_problem or stage_problem(stages, "frames"))
    return out


def build(work, gpu_info="", start=None, cap=None):
    """The text of RESULTS.md for the stage outputs in ``work``."""
    from taillor.bench import format_markdown
    lines = [f"## GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", ""]
    info = _info(os.path.join(work, "info.log"))
    lines.append(f"- GPU: {gpu_info or info.get('device', 'unknown')}")
    lines.append(f"- torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda', '?')}), triton "
                 f"{info.get('triton', '?')}, Python {info.get('python', '?')}; Triton kernels: "
                 f"{info.get('triton_kernels', '?')}; adapter route by default: {info.get('adapter_route', '?')}")
    if start is not None:
        lines.append(f"- `bash benchmarks/gpu_check.sh`: {int(time.time()) - int(start)} s of a {cap} s cap")
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    stages = read_stages(work)
    lines += [f"| {name} | {status} | {took} |" for name, (status, took) in stages.items()] or ["| (none) | | |"]
    lines.append("")
    for title, name in (("Compiled-kernel tests", "tests.xml"), ("CUDA extension tests", "ext_tests.xml")):
        summary = junit_summary(os.path.join(work, name))
        if summary and summary[3]:
            lines.append(f"{title}, failed: " + ", ".join(summary[3][:20]) + ("" if len(summary[3]) <= 20 else ", …"))
    measured = junit_properties(os.path.join(work, "ext_tests.xml"))
    if measured:  # e.g. the TF32 range finder's error against float64, next to the fp32 path's
        lines += ["", "| test | figure | value |", "|---|---|---|"]
        lines += [f"| {test} | {name} | {value} |" for test, name, value in measured]
    rows = []
    for name in ("speed.json", "frames.json"):
        rows += (_read_json(os.path.join(work, name)) or {}).get("rows", [])
    if rows:
        lines += ["", format_markdown(rows)]
    host = [r for r in rows if r.get("suite") == "adapter" and "host_ms" in r]
    if host:
        lines += ["", "| method | device ms/step | host ms/step to issue | host-bound |", "|---|---|---|---|"]
        lines += [f"| {r['label']}, {r.get('frame', '?')} frame | {r['fwd_bwd_ms']:.3f} | {r['host_ms']:.3f} | "
                  f"{'yes' if r['host_bound'] else 'no'} |" for r in host]
    lines += ["", "### Cost model against the measurement", "", *cost_model(rows, gpu_info)]
    lines += ["", "### Verdict", "", "| GPU goal | figure | verdict |", "|---|---|---|"]
    lines += [f"| {goal} | {figure} | {result} |" for goal, figure, result in verdicts(work)]
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
    tmp = results + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, results)
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
