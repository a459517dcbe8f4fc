"""The causal-LM demo's retention probe, third task and three-task metrics, on CPU with tiny stand-ins.

The probe's agreement and NLL are checked against a float64 oracle computed token by token without batching or
padding; the greedy answers against a plain argmax loop without a cache; the CSV task against its contract
(split by year, deduplicated, seeded); the metrics against their formulas written out.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_matches_oracle
from taillor.demo import llm_data, llm_probe
from taillor.demo.data import DataUnavailable


class Bigram(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a causal LM whose next-token distribution is known exactly."""

    def __init__(self, vocab: int = 11, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def _oracle(table: torch.Tensor, pairs) -> tuple[float, float]:
    """Agreement and mean NLL of the answers, one token at a time, float64."""
    hits, nll, n = 0, 0.0, 0
    for prompt, answer in pairs:
        seq = list(prompt) + list(answer)
        for pos in range(len(prompt), len(seq)):
            row = table[seq[pos - 1]].double()
            hits += int(int(row.argmax()) == seq[pos])
            nll += float(torch.logsumexp(row, 0) - row[seq[pos]])
            n += 1
    return hits / n, nll / n


def test_answer_agreement_matches_a_token_by_token_float64_oracle():
    model = Bigram()
    pairs = [([1, 2, 3], [4, 5]), ([7], [0, 9, 9, 2]), ([3, 3, 3, 3, 3], [6]), ([2, 8], [1, 1, 1])]
    for batch_size in (1, 3, 8):  # padding and batch boundaries must not change the result
        got = llm_probe.answer_agreement(model, pairs, pad_token_id=10, batch_size=batch_size)
        agreement, nll = _oracle(model.table.detach(), pairs)
        assert got["tokens"] == 10
        assert got["agreement"] == agreement
        assert_matches_oracle(torch.tensor(got["nll"]), torch.tensor(nll), torch.float32, "answer NLL")
    assert model.training  # put back in its mode


def test_answer_agreement_rejects_an_empty_probe():
    with pytest.raises(ValueError, match="at least one"):
        llm_probe.answer_agreement(Bigram(), [], pad_token_id=0)


class _ChatTokenizer:
    """A chat template in token ids: [50] + prompt bytes mod 40 + [51] (the assistant header)."""

    eos_token_id, pad_token_id = 2, 0

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize and messages[0]["role"] == "user"
        return [50] + [3 + b % 40 for b in messages[0]["content"].encode()] + [51]

    def convert_tokens_to_ids(self, token):
        return 1 if token == "<|im_end|>" else None


def _tiny_llama():
    transformers = pytest.importorskip("transformers", reason="the LLM demo needs transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config).double()
    model.eval()
    return model


def test_base_answers_are_the_greedy_answers_and_agree_with_themselves():
    model, tok = _tiny_llama(), _ChatTokenizer()
    prompts = ("Hi", "What is the longest river?", "Name a colour.")
    pairs = llm_probe.base_answers(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for prompt, (ids, answer) in zip(prompts, pairs):
        assert ids == tok.apply_chat_template([{"role": "user", "content": prompt}], True, True)
        expected, seq = [], list(ids)  # the oracle: argmax of a full forward pass, no cache, no padding
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                if nxt in (1, 2):
                    break
                expected.append(nxt)
                seq.append(nxt)
        assert answer == expected
    assert len(pairs) == len(prompts)  # (a random tiny model never stops within six tokens here)
    assert llm_probe.answer_agreement(model, pairs, pad_token_id=0)["agreement"] == 1.0


def test_probe_prompts_are_distinct_and_held_out():
    prompts = llm_probe.PROBE_PROMPTS
    assert len(set(prompts)) == len(prompts) >= 24
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm_probe.base_answers(Bigram(), _ChatTokenizer(), prompts, max_new_tokens=0)


# ------------------------------------------------------------------------------------------- the CSV task

_TABLE = """# a comment line
Date,A,B
1990-01-01,1.234567,2.5
1990-02-01,,
1990-03-01,1.3,
1991-01-01,4.0,5.0
1991-02-01,4.0,5.0
1991-03-01,4.1,5.12345
1992-01-01,7,8
1993-01-01,9,10
1994-01-01,11,12
1994-02-01,13,not-a-number
"""


def test_csv_corpus_splits_by_year_rounds_and_drops_empty_rows(tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text(_TABLE)
    c = llm_data.csv_corpus(seed=0, eval_share=0.4, rows_per_text=2, path=str(path))
    assert c == llm_data.csv_corpus(seed=0, eval_share=0.4, rows_per_text=2, path=str(path))
    texts = c.train + c.eval
    assert all(t.startswith("Date,A,B\n") for t in texts)
    rows = [line for t in texts for line in t.splitlines()[1:]]
    assert "1990-01-01,1.23,2.50" in rows and "1991-03-01,4.10,5.12" in rows and "1990-03-01,1.30," in rows
    assert not any(r.startswith("1990-02-01") or r.startswith("1994-02-01") for r in rows)  # empty, malformed
    assert all(len(t.splitlines()) <= 3 for t in texts)
    years = lambda ts: {line[:4] for t in ts for line in t.splitlines()[1:]}  # noqa: E731
    assert not years(c.train) & years(c.eval) and len(years(c.eval)) == 2  # round(0.4 * 5) years held out
    other = llm_data.csv_corpus(seed=3, eval_share=0.4, rows_per_text=2, path=str(path))
    assert set(other.train) | set(other.eval) == set(texts)


def test_csv_corpus_rejects_bad_arguments_and_too_few_years(tmp_path):
    path = tmp_path / "one-year.csv"
    path.write_text("Date,A\n2000-01-01,1\n2000-02-01,2\n")
    with pytest.raises(DataUnavailable, match="year"):
        llm_data.csv_corpus(path=str(path))
    with pytest.raises(ValueError, match="eval_share"):
        llm_data.csv_corpus(eval_share=1.0, path=str(path))
    with pytest.raises(ValueError, match="rows_per_text"):
        llm_data.csv_corpus(rows_per_text=0, path=str(path))


def test_csv_corpus_of_matplotlib_is_deterministic_and_disjoint():
    try:
        first = llm_data.csv_corpus(seed=0)
    except DataUnavailable as e:
        pytest.skip(str(e))
    assert first == llm_data.csv_corpus(seed=0)
    assert first.train and first.eval and not set(first.train) & set(first.eval)
    assert len(set(first.train)) == len(first.train) and len(set(first.eval)) == len(first.eval)
    share = len(first.eval) / (len(first.train) + len(first.eval))
    assert 0.1 < share < 0.3, share


# ----------------------------------------------------------------------------------------------- metrics


def test_three_task_metrics_follow_their_formulas():
    from taillor.demo import llm_report

    assert llm_report.TASKS == ("german", "code", "csv") and llm_report.DOMAINS[-1] == "english"
    base = [100.0, 40.0, 20.0, 60.0]
    ppl = [[50.0, 42.0, 21.0, 55.0], [60.0, 30.0, 22.0, 50.0], [70.0, 33.0, 10.0, 48.0]]
    probe = [{"agreement": 0.9, "nll": 0.8}, {"agreement": 0.8, "nll": 0.9}, {"agreement": 0.7, "nll": 1.1}]
    m = llm_report.run_metrics(ppl, base, probe, {"agreement": 1.0, "nll": 0.6})
    R = [[-math.log(v) for v in row[:3]] for row in ppl]
    bwt = ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2  # every earlier task, after the last
    assert m["bwt_nats"] == pytest.approx(bwt, rel=1e-12)
    assert m["task_change"] == pytest.approx([70 / 50 - 1, 33 / 30 - 1], rel=1e-12)
    assert m["first_task_change"] == pytest.approx(70 / 50 - 1, rel=1e-12)
    assert m["plasticity"] == pytest.approx(((1 - 50 / 100) + (1 - 30 / 40) + (1 - 10 / 20)) / 3, rel=1e-12)
    assert m["probe_agreement"] == 0.7 and m["probe_nll_change"] == pytest.approx(0.5, rel=1e-12)
    assert m["english_change"] == pytest.approx(48 / 60 - 1, rel=1e-12)
    with pytest.raises(ValueError, match="probe"):
        llm_report.run_metrics(ppl, base, probe[:2], {"agreement": 1.0, "nll": 0.6})
    with pytest.raises(ValueError, match="perplexity matrix"):
        llm_report.run_metrics(ppl[:2], base)


def test_three_task_table_has_a_row_per_earlier_task():
    from taillor.demo import llm_report

    base = [100.0, 40.0, 20.0, 60.0]
    runs = []
    for seed, shift in ((0, 0.0), (1, 1.0)):
        ppl = [[50.0 + shift, 42.0, 21.0, 55.0], [60.0, 30.0, 22.0, 50.0], [70.0, 33.0 + shift, 10.0, 48.0]]
        probe = [{"agreement": 0.9, "nll": 0.8}] * 2 + [{"agreement": 0.7 + shift / 10, "nll": 1.1}]
        runs.append({"method": "lora-continued", "seed": seed, "ppl": ppl, "trainable_params": 5,
                     "tokens_per_second": 100.0, "wall_seconds": 3.0,
                     "metrics": llm_report.run_metrics(ppl, base, probe, {"agreement": 1.0, "nll": 0.6})})
    agg = llm_report.aggregate(runs, ["lora-continued"])
    assert agg["lora-continued"]["probe_agreement"] == pytest.approx((0.75, math.sqrt(0.005)), rel=1e-12)
    table = llm_report.format_table(agg, base, {"agreement": 1.0, "nll": 0.6})
    assert "german Δ" in table and "code Δ" in table and "probe" in table
    assert "0.750±0.071" in table


def test_dominance_verdict_names_only_methods_at_least_as_good_on_every_axis():
    from taillor.demo import llm_report

    def entry(plasticity, bwt, probe):
        return {"plasticity": (plasticity, 0.01), "bwt_nats": (bwt, 0.01), "probe_agreement": (probe, 0.01)}

    agg = {"frozen": entry(0.0, 0.0, 1.0), "taillor-head": entry(0.40, -0.10, 0.85),
           "osf": entry(0.41, -0.02, 0.86),           # better on all three: dominates
           "lora-merged": entry(0.45, -0.20, 0.90),   # learns more, forgets more: does not
           "o-lora": entry(0.40, -0.10, 0.85)}        # equal everywhere: does not
    assert llm_report.dominators(agg) == ["osf"]
    text = llm_report.format_dominance(agg)
    assert "OSF (PEFT)" in text and "plasticity +0.010" in text and "BWT (earlier tasks kept) +0.080" in text
    del agg["osf"]
    assert "no method" in llm_report.format_dominance(agg)
