"""The causal-LM demo's retention probe: does the model still answer instructions the way the base model did?

The demo trains on raw text (German, Python code, a CSV table), never on chat turns. Answering an instruction in
the chat format is a skill the instruct-tuned base model has and the training does not teach, so any change of
those answers is loss of a pre-trained skill (English perplexity cannot show this: it falls for every method,
because the tasks teach generic text statistics).

The probe: :data:`PROBE_PROMPTS`, general instructions unrelated to the tasks, each put through the model's chat
template; the base model's greedy answer to each is computed once (:func:`base_answers`). After each task,
:func:`answer_agreement` teacher-forces the base answers and reports

* ``agreement`` - the share of answer tokens whose argmax prediction is the base answer's token (the base model
  scores about 1; 0.9 means one token in ten of the base model's answers would now come out differently),
* ``nll``       - the mean negative log-likelihood of the base answers' tokens (nats/token).

The frozen model's values are the reference; a method keeps the skill to the extent it keeps both.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["PROBE_PROMPTS", "chat_prompt_ids", "base_answers", "answer_agreement"]

# Held-out instructions: everyday knowledge, advice, definitions, short writing, simple reasoning. None is German,
# code or a table (the tasks), and none appears in any training text.
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in one sentence.",
    "Write a short poem about the sea.",
    "What are the primary colors?",
    "How do I boil an egg?",
    "Name three planets in our solar system.",
    "Why is the sky blue?",
    "Suggest a name for a friendly golden retriever.",
    "What is the difference between weather and climate?",
    "Write a polite email declining a meeting invitation.",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "What should I pack for a weekend camping trip?",
    "Describe the taste of a lemon.",
    "How many days are there in a leap year?",
    "Give me a synonym for the word happy.",
    "What does a doctor do?",
    "Summarize the story of Cinderella in two sentences.",
    "What is the boiling point of water at sea level?",
    "How can I stay motivated while studying?",
    "Tell me a fun fact about octopuses.",
    "What is the opposite of cold?",
    "Why do we need to drink water?",
    "Write a one-sentence birthday message for a friend.",
    "What is the largest ocean on Earth?",
    "How do plants get their food?",
    "Give me two ideas for a rainy day activity.",
    "What is a noun? Give an example.",
    "Who wrote Romeo and Juliet?",
    "How can I reduce stress at work?",
    "What is the main job of the heart?",
    "Explain what a rainbow is to a child.",
)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as one user turn in the model's chat template, ending with the assistant header
    (where the answer starts)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def base_answers(model: nn.Module, tokenizer, prompts: Sequence[str] = PROBE_PROMPTS, max_new_tokens: int = 32,
                 batch_size: int = 16) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` per prompt: ``model``'s greedy answer, at most ``max_new_tokens`` tokens, cut
    before the end-of-turn token. Prompts are generated in left-padded batches (one sequential decode per batch,
    not per prompt). A prompt whose answer is empty is dropped (it has nothing to compare)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = []
    try:
        for start in range(0, len(prompts), batch_size):
            prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
            width = max(map(len, prompt_ids))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
            for p, row in zip(prompt_ids, out[:, width:].tolist()):
                answer = []
                for token in row:
                    if token in stops:
                        break
                    answer.append(int(token))
                if answer:
                    pairs.append((p, answer))
    finally:
        model.train(was_training)
    return pairs


@torch.no_grad()
def answer_agreement(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                     batch_size: int = 8) -> dict:
    """Teacher-forced agreement of ``model`` with the answers in ``pairs`` (from :func:`base_answers`).

    Each sequence is prompt + answer, right-padded into a batch (B, L) of int64 ids; only the answer tokens are
    scored. Returns ``{"agreement": share of answer tokens that are the argmax prediction, "nll": mean negative
    log-likelihood of the answer tokens in nats, "tokens": how many answer tokens}`` (floats, tokens an int).
    """
    if not pairs:
        raise ValueError("answer_agreement needs at least one (prompt, answer) pair")
    was_training = model.training
    model.eval()
    hits, nll, count = 0, 0.0, 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            length = max(len(p) + len(a) for p, a in chunk)
            ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            target = torch.full((len(chunk), length), -100, dtype=torch.long)
            for row, (prompt, answer) in enumerate(chunk):
                seq = list(prompt) + list(answer)
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                target[row, len(prompt):len(seq)] = torch.tensor(list(answer))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = target[:, 1:]
            scored = labels != -100
            nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum"))
            hits += int((logits.argmax(-1).eq(labels) & scored).sum())
            count += int(scored.sum())
    finally:
        model.train(was_training)
    return {"agreement": hits / count, "nll": nll / count, "tokens": count}
