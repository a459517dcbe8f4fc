"""Small models the tests share: a tiny Llama and a nonzero starting update for TailLoR layers."""
from typing import Optional

import torch

import taillor


def tiny_llama(seed: int = 0, eos: Optional[int] = None):
    """A 2-layer Llama (vocab 40, width 16) seeded with ``seed``; ``eos`` also sets the padding id (as SmolLM2 does)
    and bos = 1, else the config's defaults."""
    import transformers

    torch.manual_seed(seed)
    tokens = {} if eos is None else {"pad_token_id": eos, "eos_token_id": eos, "bos_token_id": 1}
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      **tokens)
    return transformers.LlamaForCausalLM(config)


@torch.no_grad()
def nudge_lora_B(model, seed: int) -> None:
    """Draw every TailLoR layer's B from a seeded normal: B = 0 at init makes the penalty's gradient vanish."""
    for _, layer in taillor.iter_taillor_layers(model):
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
