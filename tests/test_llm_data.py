"""The causal-LM demo's corpora: deduplicated, deterministic, disjoint splits; token packing is lossless."""
from __future__ import annotations

import pytest

from taillor.demo import llm_data


def _no_overlap(corpus):
    assert corpus.train and corpus.eval
    assert len(set(corpus.train)) == len(corpus.train), "duplicated training text"
    assert len(set(corpus.eval)) == len(corpus.eval), "duplicated evaluation text"
    assert not set(corpus.train) & set(corpus.eval), "a text is in both splits"


def test_german_corpus_is_deterministic_deduplicated_and_disjoint():
    first, again = llm_data.german_corpus(seed=0), llm_data.german_corpus(seed=0)
    assert first == again
    _no_overlap(first)
    assert all("%(" not in t and "<" not in t and len(t) >= 12 for t in first.train + first.eval)
    share = len(first.eval) / (len(first.train) + len(first.eval))
    assert 0.1 < share < 0.3, share
    other = llm_data.german_corpus(seed=1)
    assert set(other.eval) != set(first.eval)
    assert set(other.train) | set(other.eval) == set(first.train) | set(first.eval)


def test_german_translations_of_one_message_stay_on_one_side(tmp_path, monkeypatch):
    catalog = tmp_path / "django.po"
    catalog.write_text('msgid ""\nmsgstr "header"\n\n'
                       'msgid "Save the object"\nmsgstr "Das Objekt speichern"\n\n'
                       'msgid "Delete the object"\nmsgstr "Das Objekt löschen bitte"\n\n', encoding="utf-8")
    js = tmp_path / "djangojs.po"
    js.write_text('msgid "Save the object"\nmsgstr "Objekt jetzt speichern"\n\n', encoding="utf-8")
    monkeypatch.setattr(llm_data, "django_locale_files", lambda locale: [str(catalog), str(js)])
    checked = 0
    for seed in range(20):
        try:
            corpus = llm_data.german_corpus(seed=seed, eval_share=0.5)
        except llm_data.DataUnavailable:  # everything fell on one side for this seed
            continue
        for side in (corpus.train, corpus.eval):
            assert ("Das Objekt speichern" in side) == ("Objekt jetzt speichern" in side)
        checked += 1
    assert checked >= 5, f"only {checked} of 20 seeds split the two messages both ways"


def _fake_stdlib(root):
    (root / "alpha.py").write_text("def a():\n    return 1\n" * 30)
    (root / "beta.py").write_text("def b(x):\n    return x + 2\n" * 30)
    pkg = root / "gamma"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class G:\n    value = 'gamma package'\n" * 30)
    (pkg / "sub.py").write_text("def a():\n    return 1\n" * 30)  # the same code as alpha: deduplicated
    (root / "test").mkdir()
    (root / "test" / "__init__.py").write_text("def excluded():\n    pass\n" * 30)
    (root / "notes.txt").write_text("not python")
    return root


def _code(root, seed):
    try:
        return llm_data.code_corpus(seed=seed, eval_share=0.5, max_chars=120, min_chars=20, root=str(root))
    except llm_data.DataUnavailable:  # all three modules fell on one side for this seed
        return None


def test_code_corpus_splits_by_module_and_deduplicates(tmp_path):
    root = _fake_stdlib(tmp_path)
    corpora = {seed: corpus for seed in range(12) if (corpus := _code(root, seed)) is not None}
    assert corpora, "no seed split the three modules both ways"
    for seed, corpus in corpora.items():
        _no_overlap(corpus)
        assert corpus == _code(root, seed)
        texts = corpus.train + corpus.eval
        assert not any("excluded" in t for t in texts), "the test package must be excluded"
        assert all(len(t) <= 120 for t in texts)
        for marker in ("return 1", "return x + 2", "gamma package"):  # each module lies on one side only
            sides = {side for side, part in (("train", corpus.train), ("eval", corpus.eval))
                     if any(marker in t for t in part)}
            assert len(sides) == 1, (marker, sides)


def test_code_corpus_of_the_real_stdlib_is_deterministic_and_disjoint():
    first = llm_data.code_corpus(seed=0)
    _no_overlap(first)
    assert first == llm_data.code_corpus(seed=0)


def test_english_texts_are_deduplicated_and_seeded():
    texts = llm_data.english_texts(seed=0)
    assert len(set(texts)) == len(texts) > 1000
    assert texts == llm_data.english_texts(seed=0)
    assert texts != llm_data.english_texts(seed=1) and set(texts) == set(llm_data.english_texts(seed=1))


def test_bad_eval_share_is_rejected():
    with pytest.raises(ValueError, match="eval_share"):
        llm_data.code_corpus(eval_share=1.0)


def _chars(text):
    return [ord(c) for c in text]


def test_packing_is_lossless_and_keeps_texts_whole():
    texts = ["abc", "defgh", "ij", "a" * 23, "klm"]
    blocks = llm_data.pack_token_blocks(texts, _chars, block_tokens=10, separator=[0])
    assert all(1 <= len(b) <= 10 for b in blocks)
    flat = [t for b in blocks for t in b]
    assert flat == [t for text in texts for t in _chars(text) + [0]]
    # short texts are never cut: each starts and ends inside one block
    for text in ("abc", "defgh", "ij", "klm"):
        assert any(_chars(text) + [0] == b[i:i + len(text) + 1] for b in blocks for i in range(len(b)))
    assert llm_data.pack_token_blocks(texts, _chars, block_tokens=10, separator=[0], max_blocks=2) == blocks[:2]


def test_packing_rejects_tiny_blocks():
    with pytest.raises(ValueError, match="block_tokens"):
        llm_data.pack_token_blocks(["abc"], _chars, block_tokens=1)
