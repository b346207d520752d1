"""Item codes as index tokens: level a, b, c, ... and code number -> "<a_12><b_3><c_200>"."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def level_letter(level: int) -> str:
    if not 0 <= level < 26:
        raise ValueError(f"level {level} has no token letter (at most 26 levels, a..z)")
    return chr(ord("a") + level)


def index_token(level: int, code: int) -> str:
    """The added token that writes ``code`` at ``level``: index_token(0, 12) == "<a_12>"."""
    return f"<{level_letter(level)}_{int(code)}>"


def code_tokens(code: Sequence[int]) -> str:
    """[12, 3, 200, 7] -> "<a_12><b_3><c_200><d_7>"."""
    return "".join(index_token(level, c) for level, c in enumerate(code))


def index_token_strings(codes: Iterable[Sequence[int]]) -> list[str]:
    """Every (level, code) token used by any item, ordered by level then code number."""
    used = {(level, int(c)) for code in codes for level, c in enumerate(code)}
    return [index_token(level, c) for level, c in sorted(used)]


def parse_code_tokens(text: str) -> list[int]:
    """"<a_12><b_3>" -> [12, 3]; raises ValueError unless the text is exactly tokens of levels a, b, ..."""
    parts = _TOKEN.findall(text)
    if "".join(f"<{letter}_{num}>" for letter, num in parts) != text.strip() or not parts:
        raise ValueError(f"not an item code: {text!r}")
    letters = [letter for letter, _ in parts]
    if letters != [level_letter(i) for i in range(len(parts))]:
        raise ValueError(f"item code levels out of order: {text!r}")
    return [int(num) for _, num in parts]
