"""Text bound for a terminal, made inert: names and messages come from users' folders and from
servers, and a name holding ESC could otherwise move the cursor, recolour, retitle or clear the
screen of whoever runs `lorawarm status` or reads the console log.

JSON output needs none of this (JSON escapes control characters itself).
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls (ESC and CSI among them), and the invisible characters that
# reorder or split what a terminal shows: bidi marks, embeddings, overrides and isolates
# ("Trojan Source"), line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_BUT_LINES = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_lines: bool = False) -> str:
    """`text` with every control character written as a Python-style escape (`\\x1b`, `\\n`,
    `\\u202e`), so that it shows as text and does nothing to the terminal.

    `keep_lines` leaves newlines and tabs alone (for tracebacks, which are many lines).
    """
    return (_UNSAFE_BUT_LINES if keep_lines else _UNSAFE).sub(_escape, text)
