"""The demo's methods and reports: the frozen reference never changes its encoder, plasticity is paired with the
frozen run of the same seed, the frontier marks dominated points, and the command line rejects bad values."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from taillor.demo import frontier, summary
from taillor.demo.methods import Method, train_sequence
from taillor.demo.run import build_parser, prepare, settings_from_args
from taillor.demo.settings import QUICK
from taillor.demo.tasks import EARLIER_TASKS

TINY = QUICK.__class__(n_train=4, n_test=2, retrieval_pairs=8, steps=2, max_length=16, seeds=1, workers=1)


@pytest.fixture(scope="module")
def ctx():
    return prepare(TINY, log=lambda *_: None)


def test_frozen_reference_leaves_every_encoder_parameter_bit_identical(ctx):
    method = Method("frozen", ctx["model"], TINY, seed=0)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    record = train_sequence(method, ctx, TINY, seed=0, log=lambda *_: None, progress=False)
    after = method.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert record["trainable_params"] == 0 and record["spectral"] == []
    assert record["probes"]["cosine_to_base"][-1] == pytest.approx(1.0, abs=1e-9)  # the same vectors: 1 to rounding
    # its encoder is the base model: every probe value is the base model's, measured once in prepare
    assert record["probes"]["retrieval_r1"] == [ctx["base_values"]["retrieval_r1"]] * (len(ctx["tasks"]) + 1)


def test_a_trained_method_does_change_its_encoder(ctx):
    method = Method("lora-merged", ctx["model"], TINY, seed=0)
    before = {k: v.clone() for k, v in method.model.state_dict().items() if "query" in k and "weight" in k}
    train_sequence(method, ctx, TINY, seed=0, log=lambda *_: None, progress=False)
    after = method.model.state_dict()  # merged after each task: the base weights moved
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


def _run(method, seed, acc_rows, r1_final=0.5, cos=0.9):
    return {"method": method, "seed": seed, "R": acc_rows, "metrics": {"acc": sum(acc_rows[-1]) / 2, "bwt": 0.0,
            "forgetting": 0.0}, "probes": {"retrieval_r1": [0.5, r1_final], "cosine_to_base": [1.0, cos]},
            "head_share": 0.1, "wall_seconds": 1.0, "trainable_params": 10}


def test_plasticity_is_paired_with_the_frozen_run_of_the_same_seed():
    runs = [_run("frozen", 0, [[0.6, None], [0.6, 0.5]]), _run("frozen", 1, [[0.7, None], [0.7, 0.7]]),
            _run("lora-merged", 0, [[0.8, None], [0.7, 0.7]]), _run("lora-merged", 1, [[0.8, None], [0.7, 0.9]]),
            _run("full-ft", 2, [[0.8, None], [0.7, 0.9]])]
    summary.with_plasticity(runs)
    assert runs[2]["plasticity"] == pytest.approx(0.7 - 0.55)
    assert runs[3]["plasticity"] == pytest.approx(0.8 - 0.7)
    assert runs[0]["plasticity"] == 0.0 and runs[4]["plasticity"] is None  # no frozen run with seed 2
    table = summary.format_table(runs, ["frozen", "lora-merged", "full-ft"])
    assert "plasticity" in table.splitlines()[0]
    assert table.splitlines()[2].startswith("frozen")
    assert "+0.125±0.035" in table and "n/a" in table


def test_frontier_marks_dominated_points_per_retention_axis():
    rows = [{"plasticity": (0.0, 0), "r1_retention": (1.0, 0), "cosine": (1.0, 0)},
            {"plasticity": (0.1, 0), "r1_retention": (0.9, 0), "cosine": (0.8, 0)},
            {"plasticity": (0.05, 0), "r1_retention": (0.8, 0), "cosine": (0.9, 0)},
            {"plasticity": (0.1, 0), "r1_retention": (0.95, 0), "cosine": (0.7, 0)}]
    assert frontier.dominated(rows, "r1_retention") == [False, True, True, False]
    assert frontier.dominated(rows, "cosine") == [False, False, False, True]


def test_frontier_grid_sweeps_every_method():
    points = frontier.frontier_points(TINY)
    assert {p.method for p in points} == {"frozen", "taillor-full", "taillor-head", "lora-merged", "lora-continued",
                                          "full-ft", "osf", "pissa-merged", "o-lora"}
    for method in ("osf", "pissa-merged", "o-lora"):  # every peer over a grid as large as LoRA's
        assert len({p.settings(TINY).lr_of(method) for p in points if p.method == method}) == 3
    for method in ("lora-merged", "lora-continued"):
        assert len({dict(p.overrides)["lr_lora"] for p in points if p.method == method}) >= 3  # tuned, not fixed
    for method in ("taillor-full", "taillor-head"):  # each frame's own learning rate, ×0.3 and ×3
        taillor_lrs = {p.settings(TINY).lr_of(method) for p in points if p.method == method}
        assert len(taillor_lrs) == 3 and TINY.lr_of(method) in taillor_lrs
    for p in points:
        if p.method.startswith("taillor"):
            p.settings(TINY).taillor_config("full", 0)  # every TailLoR point is a valid config
    quick = frontier.frontier_points(TINY, quick=True)
    assert set(quick) < set(points) and {p.method for p in quick} == {p.method for p in points} - {"full-ft"}
    for method in ("taillor-full", "taillor-head"):  # the strength sweep, λ = 0 and protect_tasks switched included
        strengths = {p.label for p in quick if p.method == method}
        toggled = f"protect_tasks={not TINY.protect_tasks}"
        assert {"λ=0", toggled} <= strengths and len(strengths) == 5
        protect = next(p for p in quick if p.method == method and p.label == toggled)
        assert protect.settings(TINY).taillor_config("head", 0).protect_tasks is not TINY.protect_tasks
    for method in ("osf", "pissa-merged", "o-lora"):  # the quick grid tunes the peers as it tunes LoRA
        assert len({p.settings(TINY).lr_of(method) for p in quick if p.method == method}) == 3


@pytest.mark.parametrize("argv, match", [(["--seeds", "0"], "seeds"), (["--methods", "nope"], "unknown method"),
                                         (["--workers", "0"], "workers"), (["--tasks", "fortunes,nope"], "nope"),
                                         (["--tasks", ","], "unknown task"),
                                         (["--head-share-target", "2"], "head_share_target")])
def test_command_line_rejects_bad_values(argv, match):
    with pytest.raises(ValueError, match=match):
        settings_from_args(build_parser().parse_args(argv))


def test_command_line_fixed_penalty_and_overrides():
    s = settings_from_args(build_parser().parse_args(["--quick", "--fixed-penalty", "--penalty", "3", "--lr-lora",
                                                      "3e-3"]))
    cfg = s.taillor_config("head", 0)
    assert cfg.head_share_target is None and cfg.penalty == 3.0 and s.lr_lora == 3e-3
    both = settings_from_args(build_parser().parse_args(["--lr", "2e-3", "--lr-taillor-head", "5e-4"]))
    assert both.lr_of("taillor-full") == 2e-3 and both.lr_of("taillor-head") == 5e-4  # the specific flag wins
    assert settings_from_args(build_parser().parse_args(["--penalty", "0"])).taillor_config("full", 0).penalty == 0
    earlier = settings_from_args(build_parser().parse_args(["--quick", "--tasks", " fortunes, language,stdlib"]))
    assert earlier.tasks == EARLIER_TASKS and earlier.steps == QUICK.steps


def test_llm_command_line_sets_the_head_share_target_and_rejects_a_bad_one(capsys):
    from taillor.demo import llm_cli
    from taillor.demo.llm import DEFAULT, taillor_overrides

    assert llm_cli.build_parser().parse_args(["--head-share-target", "0.01"]).head_share_target == 0.01
    assert taillor_overrides(replace(DEFAULT, head_share_target=0.01))["head_share_target"] == 0.01
    assert "head_share_target" not in taillor_overrides(DEFAULT)  # unset: the library's default
    assert llm_cli.main(["--head-share-target", "2", "--out", "unused"]) == 2  # fails before anything loads
    assert "head_share_target" in capsys.readouterr().err


def test_robustness_table_says_whether_the_default_lies_between_frozen_and_no_penalty():
    points = frontier.robustness_points(TINY)
    labels = {(p.method, p.label) for p in points}
    assert ("frozen", "steps ×2") in labels and ("taillor-head", "λ=0, alpha ×2") in labels
    full_only = frontier.robustness_points(replace(TINY, methods=("taillor-full",)))
    assert {p.method for p in full_only} == {"frozen", "taillor-full"}
    doubled = next(p for p in points if p.method == "taillor-full" and p.label == "default, lr ×2")
    assert doubled.settings(TINY).lr_taillor_full == 2 * TINY.lr_taillor_full
    assert doubled.settings(TINY).lr_taillor_head == TINY.lr_taillor_head

    def row(method, label, plasticity, r1, cos):
        return {"method": method, "label": label, "plasticity": (plasticity, 0), "r1_retention": (r1, 0),
                "cosine": (cos, 0), "head_share": (0.01, 0)}
    rows = [row("frozen", "as set", 0.0, 1.0, 1.0),
            row("taillor-full", "default, as set", 0.04, 1.0, 0.95), row("taillor-full", "λ=0, as set", 0.05, 0.97, 0.9),
            row("taillor-head", "default, as set", 0.0, 1.0, 0.99), row("taillor-head", "λ=0, as set", 0.05, 0.97, 0.9)]
    lines = frontier.format_robustness(rows).splitlines()
    assert lines[2].startswith("| full | as set") and lines[2].endswith("| yes |")
    assert "does not learn" in lines[3]
