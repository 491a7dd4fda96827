"""Checks of error messages by their meaning, not by a third-party parser's wording."""

from __future__ import annotations

import re


def assert_names(line: str, *tokens: str) -> None:
    """Each token appears in ``line`` as a word of its own: not inside a longer name or number
    (``n`` is named by ``"n"`` or ``--n``, not by ``int``; ``1.5`` not by ``1.55``)."""
    for token in tokens:
        assert re.search(rf"(?<!\w){re.escape(token)}(?!\w|\.\d)", line), (token, line)
