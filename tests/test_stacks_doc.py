"""docs/stacks.md: each of the four stacks' snippets runs as written on a tiny random Llama (no download), two tasks
each, and leaves what it says (consolidated tasks, saved adapters, a merged model)."""
from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

import taillor

transformers = pytest.importorskip("transformers")
from test_hf_callback import tiny_llama, word_tokenizer  # noqa: E402

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "stacks.md"


def snippets() -> dict[str, str]:
    """The python code block under each ``## heading`` of docs/stacks.md."""
    text = DOC.read_text()
    found = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        block = re.search(r"```python\n(.*?)```", section, flags=re.S)
        if block:
            found[title] = block.group(1)
    return found


def token_batches(seed: int, count: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(3, 40, (2, 8), generator=g)
                                                          for _ in range(count))]


class Rows(torch.utils.data.Dataset):
    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 40, (4, 8), generator=g)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def training_arguments(tmp_path, cls=None, **extra):
    cls = cls or transformers.TrainingArguments
    return cls(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
               report_to=[], save_strategy="no", disable_tqdm=True, seed=0, **extra)


def run(title: str, namespace: dict, tmp_path, monkeypatch) -> dict:
    code = snippets()[title]
    monkeypatch.chdir(tmp_path)
    namespace = {"taillor": taillor, "model": tiny_llama(), **namespace}
    exec(compile(code, f"docs/stacks.md ({title})", "exec"), namespace)
    return namespace


def consolidated(model) -> list[int]:
    return [layer.tasks_consolidated for _, layer in taillor.iter_taillor_layers(model)]


def test_every_stack_has_a_snippet():
    assert list(snippets()) == ["Plain PyTorch", "Hugging Face Trainer", "TRL", "PEFT"]


def test_plain_pytorch_snippet(tmp_path, monkeypatch):
    ns = run("Plain PyTorch", {"tasks": [token_batches(1), token_batches(2)]}, tmp_path, monkeypatch)
    assert consolidated(ns["model"]) == [2] * 4
    assert not ns["handle"].attached
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_hugging_face_trainer_snippet(tmp_path, monkeypatch):
    ns = run("Hugging Face Trainer", {"tasks": [Rows(1), Rows(2)], "args": training_arguments(tmp_path)},
             tmp_path, monkeypatch)
    assert consolidated(ns["model"]) == [2] * 4


@pytest.mark.slow
def test_trl_snippet(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install taillor[trl])")
    datasets = pytest.importorskip("datasets")
    texts = [datasets.Dataset.from_dict({"text": [" ".join(f"w{i + j}" for j in range(6)) for i in range(3, 7)]})
             for _ in range(2)]
    ns = run("TRL", {"text_tasks": texts, "tokenizer": word_tokenizer(),
                     "sft_args": training_arguments(tmp_path, trl.SFTConfig, max_length=16)}, tmp_path, monkeypatch)
    assert consolidated(ns["model"]) == [2] * 4


def test_peft_snippet(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="peft is not installed")
    ns = run("PEFT", {"fresh_model": tiny_llama()}, tmp_path, monkeypatch)
    assert isinstance(ns["merged"], transformers.LlamaForCausalLM) and not consolidated(ns["merged"])
    for folder in ("peft", "lora"):
        assert os.path.exists(tmp_path / "out" / folder / "adapter_model.safetensors")


def test_readme_snippets_are_the_documented_ones():
    """README's usage snippets are docs/stacks.md's, word for word, so the tests above run what README shows."""
    readme = (DOC.parents[1] / "README.md").read_text()
    usage = readme.split("## Use it in your stack", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"```python\n(.*?)```", usage, flags=re.S)
    assert len(shown) == 4, "README shows the plain PyTorch, Trainer, TRL and PEFT snippets"
    documented = set(snippets().values())
    for code in shown:
        assert code in documented, f"README snippet not in docs/stacks.md:\n{code}"
