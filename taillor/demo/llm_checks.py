"""Checks after training in the causal-LM demo: the spectral report of a method, and the serving check of a
TailLoR model (export_lora -> peft.PeftModel.from_pretrained on a fresh base -> the same perplexities)."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Union

from .llm_methods import LABELS
from .llm_report import DOMAINS

__all__ = ["SERVING_TOLERANCE", "spectral_rows", "serving_check"]

SERVING_TOLERANCE = 1e-3  # relative perplexity difference allowed between the trained and the exported model


def spectral_rows(method, pretrained: Mapping, blocks: Sequence[int], head: Union[int, float]):
    """Spectral report rows of the transformer ``blocks``: ``taillor.spectral_report`` of each block for TailLoR
    (its own frame and head), ``spectral_report_from_weights`` against ``pretrained`` ({layer name: base
    weight}) with ``head`` otherwise."""
    import taillor
    from ..report import spectral_report_from_weights

    if method.is_taillor:
        rows = []
        for block in blocks:
            prefix = f"model.layers.{block}"
            rows += [dataclasses.replace(r, name=f"{prefix}.{r.name}")
                     for r in taillor.spectral_report(method.net.get_submodule(prefix))]
        return rows
    return spectral_report_from_weights(pretrained, method.current_weights(list(pretrained)), head)


def serving_check(method, model_dir: str, evaluation: Mapping, pad_token_id: int, trained_ppl: Sequence[float],
                  directory: str, log=print) -> dict:
    """Export ``method``'s TailLoR model with ``taillor.export_lora`` to ``directory``, load it onto a fresh base
    from ``model_dir`` with ``peft.PeftModel.from_pretrained`` and compare its perplexities on ``evaluation``
    ({domain: token blocks}) with ``trained_ppl``: they must agree within SERVING_TOLERANCE (relative)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import taillor
    from .llm_model import perplexity

    taillor.export_lora(method.net, directory)
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    served = PeftModel.from_pretrained(fresh, directory)
    ppl = [perplexity(served, evaluation[d], pad_token_id) for d in DOMAINS]
    worst = max(abs(a - b) / b for a, b in zip(ppl, trained_ppl))
    ok = worst <= SERVING_TOLERANCE
    log(f"serving check {LABELS[method.name]}: export_lora → PeftModel.from_pretrained on a fresh base: ppl " +
        " ".join(f"{d} {a:.3f} (trained {b:.3f})" for d, a, b in zip(DOMAINS, ppl, trained_ppl)) +
        f"; max relative difference {worst:.1e} {'<=' if ok else '>'} {SERVING_TOLERANCE:g}: "
        f"{'MATCH' if ok else 'MISMATCH'}")
    return {"method": method.name, "served_ppl": ppl, "trained_ppl": list(trained_ppl),
            "max_relative_difference": worst, "tolerance": SERVING_TOLERANCE, "match": ok}
