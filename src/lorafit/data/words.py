"""Word units for de-duplication and decontamination, that also work for text without spaces.

Chinese, Japanese and Korean characters are one unit each, so n-grams of units become character
n-grams there and word n-grams elsewhere.
"""

from __future__ import annotations

import re

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_UNITS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def word_units(text: str) -> list[str]:
    return _UNITS.findall(text.casefold())


def ngrams(units: list[str], n: int) -> list[str]:
    if len(units) < n:
        return [" ".join(units)] if units else []
    return [" ".join(units[i : i + n]) for i in range(len(units) - n + 1)]
