"""The one name sanitiser: case-name parts (labels, file stems) and file names made from free text."""
from __future__ import annotations

import re


def safe_name(text: str, keep: str = "_-", sep: str = "-", strip: bool = True, max_len: int | None = None,
              fallback: str = "x") -> str:
    """``text`` with every run of characters other than letters, digits and ``keep`` replaced by ``sep``.

    Case-name parts use the defaults (``'a b'`` -> ``'a-b'``; nothing left -> ``'x'``); study case
    names keep no ``'_'`` (``keep='-'``); file names keep dots (``keep='._-', sep='_'``).
    ``strip`` removes ``sep`` at both ends; ``max_len`` cuts the result; ``fallback`` replaces an
    empty result.
    """
    out = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", sep, text)
    if strip:
        out = out.strip(sep)
    if max_len is not None:
        out = out[:max_len]
    return out or fallback


def case_part(text: str) -> str:
    """A label or file stem as a part of an nnU-Net case name (letters, digits, '-', '_')."""
    return safe_name(text)


def file_part(text: str, fallback: str = "") -> str:
    """Free text (a label, a feature-space name) as part of a file name, at most 60 characters."""
    return safe_name(text, keep="._-", sep="_", strip=False, max_len=60, fallback=fallback)
