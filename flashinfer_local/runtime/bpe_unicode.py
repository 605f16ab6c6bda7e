"""Where the Unicode tables of HF ``tokenizers`` and of Python differ, and how the lean BPE bridges it.

``tokenizers`` 0.2x carries three versions of Unicode: its pre-tokenizer regexes run in Oniguruma
(Unicode 16.0), its ``Digits`` step asks Rust's ``char::is_numeric`` (17.0), and its NFC comes from
an old normalization crate (9.0). The lean BPE uses the ``regex`` package (17.0) and ``unicodedata``
(Python 3.11: 14.0). Characters assigned in between are few and rare, but each changes token ids:

- letters and digits new in 17.0 are unassigned to Oniguruma, so neither letter, number nor space;
  :func:`onig_view` shows them to a regex as U+E000, a private-use character both engines class so;
- combining marks new since 9.0 are, to tokenizers' NFC, starters that reorder and compose with
  nothing, and the second halves of compositions new since 9.0 compose with nothing either;
  :func:`nfc` normalizes the text between them and leaves them as they are.

``tests/test_lean_tokenizer.py`` checks both against tokenizers on every code point, so a new
version of either library shows up there.
"""
from __future__ import annotations

import unicodedata

import regex


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


# letters (L) and numbers (N) of Unicode 17.0 that are not in Oniguruma's Unicode 16.0 tables
_ONIG_UNASSIGNED = (
    (0x088F, 0x088F), (0x0C5C, 0x0C5C), (0x0CDC, 0x0CDC), (0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2),
    (0xA7D4, 0xA7D4), (0xA7F1, 0xA7F1), (0x10940, 0x10959), (0x10EC5, 0x10EC7), (0x11DB0, 0x11DDB),
    (0x11DE0, 0x11DE9), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6), (0x187F8, 0x187FF),
    (0x18D09, 0x18D1E), (0x18D80, 0x18DF2), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6E2), (0x1E6E4, 0x1E6E5),
    (0x1E6E7, 0x1E6ED), (0x1E6F0, 0x1E6F4), (0x1E6FE, 0x1E6FF), (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD),
    (0x323B0, 0x33479))

# combining marks (ccc > 0) of Unicode 10.0-17.0, and second halves of compositions of 13.0-16.0
# (U+11930, and the Tulu-Tigalari, Gurung Khema and Kirat Rai vowel signs)
_NFC_UNKNOWN = (
    (0x07FD, 0x07FD), (0x0897, 0x089F), (0x08CA, 0x08D3), (0x09FE, 0x09FE), (0x0C3C, 0x0C3C),
    (0x0D3B, 0x0D3C), (0x0EBA, 0x0EBA), (0x1715, 0x1715), (0x1ABF, 0x1ADD), (0x1AE0, 0x1AEB),
    (0x1DF6, 0x1DFA), (0xA82C, 0xA82C), (0x10D24, 0x10D27), (0x10D69, 0x10D6D), (0x10EAB, 0x10EAC),
    (0x10EFA, 0x10EFB), (0x10EFD, 0x10EFF), (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070),
    (0x1133B, 0x1133B), (0x113B8, 0x113B8), (0x113BB, 0x113BB), (0x113C2, 0x113C2), (0x113C5, 0x113C5),
    (0x113C7, 0x113C9), (0x113CE, 0x113D0), (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x11930, 0x11930),
    (0x1193D, 0x1193E), (0x11943, 0x11943), (0x119E0, 0x119E0), (0x11A34, 0x11A34), (0x11A47, 0x11A47),
    (0x11A99, 0x11A99), (0x11D42, 0x11D42), (0x11D44, 0x11D45), (0x11D97, 0x11D97), (0x11F41, 0x11F42),
    (0x1611E, 0x16129), (0x1612F, 0x1612F), (0x16D67, 0x16D68), (0x16FF0, 0x16FF1), (0x1E08F, 0x1E08F),
    (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1E4EC, 0x1E4EF), (0x1E5EE, 0x1E5EF),
    (0x1E6E3, 0x1E6E3), (0x1E6E6, 0x1E6E6), (0x1E6EE, 0x1E6EF), (0x1E6F5, 0x1E6F5))

_ONIG_RE = regex.compile(_char_class(_ONIG_UNASSIGNED))
_NFC_RE = regex.compile(_char_class(_NFC_UNKNOWN))
_NFC_SPLIT = regex.compile("(" + _char_class(_NFC_UNKNOWN) + ")")


def onig_view(text: str) -> str:
    """``text`` as Oniguruma classes it, character for character (same length)."""
    return _ONIG_RE.sub("\ue000", text)


def nfc(text: str) -> str:
    """NFC as tokenizers computes it."""
    if _NFC_RE.search(text) is None:
        return unicodedata.normalize("NFC", text)
    return "".join(unicodedata.normalize("NFC", part) for part in _NFC_SPLIT.split(text))
