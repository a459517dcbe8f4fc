"""Reading gettext catalogs (``.po`` files), as Django ships them for the demos' language data."""

from __future__ import annotations

import re

__all__ = ["read_po"]


def _po_unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1]
    return s.replace('\\"', '"').replace("\\n", " ").replace("\\t", " ").replace("\\\\", "\\")


def read_po(path: str) -> list[tuple[str, str]]:
    """``(msgid, msgstr)`` pairs of a gettext catalog; plural entries give ``(msgid, msgstr[0])``.

    Fuzzy entries and the header are skipped; an empty msgstr is kept (English catalogs).
    """
    entries: list[tuple[str, str]] = []
    cur: dict[str, str] = {}
    key = None
    fuzzy = False

    def flush():
        nonlocal cur, fuzzy
        if "msgid" in cur and cur["msgid"] and not fuzzy:
            entries.append((cur["msgid"], cur.get("msgstr", cur.get("msgstr[0]", ""))))
        cur, fuzzy = {}, False

    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                flush()
                key = None
                continue
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
                continue
            if line.startswith("#"):
                continue
            m = re.match(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(.*)$", line)
            if m:
                key = m.group(1)
                if key == "msgid" and "msgid" in cur:
                    flush()
                cur[key] = _po_unquote(m.group(2))
            elif line.startswith('"') and key is not None:
                cur[key] = cur.get(key, "") + _po_unquote(line)
    flush()
    return entries
