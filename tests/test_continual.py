"""taillor.continual: metrics on hand-computed matrices, input validation, and the runner on tiny tasks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_scalar_matches
from taillor.continual import (
    ContinualRunner,
    as_accuracy_matrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    frozen_reference,
    mean_cosine_similarity,
    retention,
    summarize,
)

NAN = float("nan")

# R[i][j]: accuracy on task j after training task i
R3 = [
    [0.90, NAN, NAN],
    [0.70, 0.80, NAN],
    [0.60, 0.85, 0.95],
]


def test_metrics_hand_computed():
    # ACC = (0.60 + 0.85 + 0.95) / 3
    assert average_accuracy(R3) == pytest.approx(0.80)
    # BWT = ((0.60 - 0.90) + (0.85 - 0.80)) / 2
    assert backward_transfer(R3) == pytest.approx(-0.125)
    # f_0 = max(0.90, 0.70) - 0.60 = 0.30; f_1 = max(0.80) - 0.85 = -0.05
    assert forgetting(R3, per_task=True) == pytest.approx([0.30, -0.05])
    assert forgetting(R3) == pytest.approx(0.125)


def test_forgetting_uses_best_earlier_accuracy_not_the_first():
    R = [[0.5, NAN, NAN], [0.9, 0.7, NAN], [0.6, 0.7, 0.8]]
    # task 0 peaked after task 1 (0.9): f_0 = 0.9 - 0.6; BWT only sees 0.6 - 0.5
    assert forgetting(R, per_task=True) == pytest.approx([0.3, 0.0])
    assert backward_transfer(R) == pytest.approx((0.1 + 0.0) / 2)


def test_single_task_and_array_inputs():
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert backward_transfer([[0.7]]) == 0.0
    assert forgetting([[0.7]]) == 0.0
    full = np.array([[1.0, 0.2], [0.5, 1.0]])  # above-diagonal entries are ignored
    assert average_accuracy(full) == pytest.approx(0.75)
    assert backward_transfer(torch.tensor(full)) == pytest.approx(-0.5)


def test_summarize_per_step_accuracy():
    s = summarize(R3)
    assert s["acc_per_step"] == pytest.approx([0.90, 0.75, 0.80])
    assert s["acc"] == pytest.approx(0.80)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([[0.1, 0.2]], "square"),
        ([[0.1, NAN], [0.2]], "square"),
        ([[0.1, NAN], [float("inf"), 0.3]], r"R\[1\]\[0\] = inf"),
        ([[NAN]], r"R\[0\]\[0\] = nan"),
        ([[0.1, NAN], ["x", 0.2]], r"R\[1\]\[0\] = 'x'"),
        (5, "2-D"),
    ],
)
def test_invalid_matrices_raise(bad, match):
    for fn in (as_accuracy_matrix, average_accuracy, backward_transfer, forgetting):
        with pytest.raises(ValueError, match=match):
            fn(bad)


def test_retention_and_cosine():
    assert retention([0.8, 0.4], 0.8) == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="non-zero"):
        retention([0.5], 0.0)
    with pytest.raises(ValueError, match="score 1"):
        retention([0.5, NAN], 0.5)
    a = torch.randn(5, 3)
    assert mean_cosine_similarity(a, a) == pytest.approx(1.0)
    assert mean_cosine_similarity(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same shape"):
        mean_cosine_similarity(a, a[:4])


def test_runner_call_order_and_shapes():
    calls = []
    tasks = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    table = {(0, 0): 0.9, (1, 0): 0.8, (1, 1): 0.7, (2, 0): 0.6, (2, 1): 0.7, (2, 2): 1.0}
    state = {"t": -1}

    def train(t, task):
        calls.append(("train", t))
        state["t"] = t
        return {"loss": 1.0 / (t + 1)}

    def after(t, task):
        calls.append(("after", t))

    def evaluate(j, task):
        calls.append(("eval", j))
        return table[(state["t"], j)]

    res = ContinualRunner(tasks, train, evaluate, after_task=after, probes={"p": lambda: 0.5}).run()
    assert calls == [("train", 0), ("after", 0), ("eval", 0),
                     ("train", 1), ("after", 1), ("eval", 0), ("eval", 1),
                     ("train", 2), ("after", 2), ("eval", 0), ("eval", 1), ("eval", 2)]
    assert res.task_names == ["a", "b", "c"]
    assert math.isnan(res.R[0][1]) and res.R[2][0] == 0.6
    assert res.probes["p"] == [0.5] * 4
    assert [i["loss"] for i in res.train_info] == pytest.approx([1.0, 0.5, 1 / 3])
    m = res.metrics()
    assert m["acc"] == pytest.approx((0.6 + 0.7 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.7)) / 2)
    d = res.to_dict()
    assert d["R"][0][1] is None and d["metrics"]["acc"] == pytest.approx(m["acc"])


def test_runner_rejects_bad_callbacks_and_scores():
    with pytest.raises(ValueError, match="at least one task"):
        ContinualRunner([], lambda t, x: None, lambda j, x: 1.0)
    with pytest.raises(TypeError, match="eval_fn"):
        ContinualRunner([1], lambda t, x: None, "nope")
    runner = ContinualRunner([1, 2], lambda t, x: None, lambda j, x: float("nan"))
    with pytest.raises(ValueError, match=r"eval_fn returned nan for task 0 \(task0\) after task 0"):
        runner.run()


def _cluster_task(gen, centers, n):
    """Points around ``centers`` (C, d) with labels 0..C-1."""
    C, d = centers.shape
    y = torch.arange(C).repeat_interleave(n)
    x = centers[y] + 0.3 * torch.randn(C * n, d, generator=gen)
    return x, y


def test_runner_on_tiny_synthetic_sequence_shows_forgetting_of_plain_finetuning():
    """A shared encoder with one head per task, trained on 3 tasks whose class structure lives in disjoint
    subspaces. Plain SGD on the shared encoder lets later tasks overwrite earlier ones; freezing the encoder
    (a stand-in for a method that protects old knowledge) forgets nothing. The runner and metrics must tell
    the two apart."""
    gen = torch.Generator().manual_seed(0)
    d, T, C = 12, 3, 3
    tasks = []
    for t in range(T):
        centers = torch.zeros(C, d)
        centers[:, 4 * t : 4 * t + 4] = 2.0 * torch.randn(C, 4, generator=gen)
        xtr, ytr = _cluster_task(gen, centers, 40)
        xte, yte = _cluster_task(gen, centers, 20)
        tasks.append({"name": f"t{t}", "train": (xtr, ytr), "test": (xte, yte), "C": C})

    def run(train_encoder: bool):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(d, 2), nn.Tanh())
        heads = nn.ModuleList()

        def train(t, task):
            heads.append(nn.Linear(2, task["C"]))
            params = list(heads[t].parameters()) + (list(enc.parameters()) if train_encoder else [])
            opt = torch.optim.SGD(params, lr=0.5)
            x, y = task["train"]
            for _ in range(100):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(heads[t](enc(x)), y)
                loss.backward()
                opt.step()
            return loss.item()

        def after(t, task):
            heads[t].requires_grad_(False)

        @torch.no_grad()
        def evaluate(j, task):
            x, y = task["test"]
            return (heads[j](enc(x)).argmax(1) == y).float().mean().item()

        return ContinualRunner(tasks, train, evaluate, after_task=after).run()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronisation on a busy machine
    try:
        plain = run(train_encoder=True)
        frozen = run(train_encoder=False)
    finally:
        torch.set_num_threads(threads)
    for res in (plain, frozen):
        assert len(res.R) == T and len(res.train_seconds) == T
        assert all(0.0 <= res.R[i][j] <= 1.0 for i in range(T) for j in range(i + 1))
    # a frozen model's accuracies are equal floats: their differences are zero up to Python float rounding
    assert forgetting(frozen.R) == pytest.approx(0.0, abs=1e-9)
    assert backward_transfer(frozen.R) == pytest.approx(0.0, abs=1e-9)
    # the plain run learns each task when it trains on it ...
    assert min(plain.R[t][t] for t in range(T)) > 0.9
    # ... and forgets: some earlier task loses accuracy
    assert forgetting(plain.R) > 0.1
    assert backward_transfer(plain.R) < -0.1


# ------------------------------------------------------------------------------------ spectral report


def test_spectral_shares_head_and_tail_updates():
    from taillor.report import spectral_shares

    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    S = torch.linspace(10, 1, 10, dtype=torch.float64)
    W = U[:, :10] @ torch.diag(S) @ V.t()
    head_update = 0.1 * U[:, :2] @ V[:, :2].t()
    tail_update = 0.1 * U[:, 5:7] @ V[:, 5:7].t()
    row = spectral_shares("w", W, head_update, head_size=3)
    assert row.head_share_left == pytest.approx(1.0) and row.head_share_right == pytest.approx(1.0)
    row = spectral_shares("w", W, tail_update, head_size=3)  # float64 throughout: zero to a few ulps (abs=1e-12)
    assert row.head_share_left == pytest.approx(0.0, abs=1e-12) and row.head_share_right == pytest.approx(0.0, abs=1e-12)
    assert row.uniform_share == pytest.approx(0.3)
    assert row.stable_rank_before == pytest.approx(float((S ** 2).sum() / S[0] ** 2))
    assert row.relative_delta == pytest.approx(float(tail_update.norm() / W.norm()))
    # left and right shares differ for a one-sided update: U_h on the left, a tail direction on the right
    mixed = 0.1 * U[:, :1] @ V[:, 8:9].t()
    row = spectral_shares("w", W, mixed, head_size=3)  # float64 throughout, as above
    assert row.head_share_left == pytest.approx(1.0) and row.head_share_right == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="head_size=10"):
        spectral_shares("w", W, mixed, head_size=10)
    with pytest.raises(ValueError, match="same shape"):
        spectral_shares("w", W, mixed[:5], head_size=3)


def test_spectral_report_on_a_taillor_model_matches_weights_form(tmp_path):
    import taillor
    from taillor.report import format_spectral_report, linear_weights, plot_spectral_report, spectral_report, \
        spectral_report_from_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))
    pre = linear_weights(model, lambda name: True)
    assert list(pre) == ["0", "2"] and torch.equal(pre["2"], model[2].weight)
    assert pre["2"].data_ptr() != model[2].weight.data_ptr()  # a copy: training does not move it
    assert list(linear_weights(model, lambda name: name != "0")) == ["2"]
    cfg = taillor.TailLoRConfig(rank=2, alpha=4, target_modules=["0", "2"], head=3, penalty=0.0)
    taillor.apply_taillor(model, cfg)
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    taillor.consolidate(model)  # the report covers consolidated tasks too
    for _, layer in taillor.iter_taillor_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    rows = spectral_report(model)
    assert [r.name for r in rows] == ["0", "2"]
    current = {name: (layer.pretrained_weight() + layer.learned_delta()).detach()
               for name, layer in taillor.iter_taillor_layers(model)}
    ref = spectral_report_from_weights(pre, current, head=3)
    for a, b in zip(rows, ref):
        assert_scalar_matches(a.head_share_left, b.head_share_left, f"{a.name} left share", kind="share")
        assert_scalar_matches(a.head_share_right, b.head_share_right, f"{a.name} right share", kind="share")
        assert_scalar_matches(a.stable_rank_after, b.stable_rank_after, f"{a.name} stable rank")
    assert "mean" in format_spectral_report(rows)
    path = plot_spectral_report({"a": rows, "b": ref}, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").stat().st_size > 1000 and path.endswith("s.png")
    with pytest.raises(ValueError, match="no TailLoR layers"):
        spectral_report(nn.Linear(3, 3))


def test_frozen_reference_is_a_frozen_copy_and_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reference = frozen_reference(model)
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with pytest.raises(TypeError, match="nn.Module, got dict"):
        frozen_reference({})
