"""A BPE ``tokenizer.json`` read into a few arrays, without a Python object per token.

Two shapes: byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama 3: tokens spell bytes in GPT-2's
alphabet) and the SentencePiece BPE that ``storage.gguf_tokenizer`` rebuilds from a GGUF's pieces
(Gemma: tokens are text with U+2581 for spaces, ``<0xNN>`` pieces for bytes without a piece of
their own; ``Tables.rest["spm"]``).

``json.load`` of Qwen2.5's 5.1 MiB file holds ~55 MiB in ~750k small objects, and the pymalloc
pools they touched stay partly resident once they are freed (a json-based first version of this
reader kept 4-5 MiB above its own tables, 3.8x SmolLM2's file in all).
So the two big members, ``model.vocab`` and ``model.merges``, are scanned straight from the file's
bytes into compact arrays, one entry at a time; ``json`` parses only the small rest, with those two
cut out. Token strings are found by the Python ``hash`` of their UTF-8 (``key``) in a sorted int64
array (the hash is per process, and so are these tables), and every lookup that can be checked
against the bytes is.

A file this reader or :func:`_check` does not follow raises :class:`UnsupportedTokenizer`: the
caller then uses HF ``tokenizers``, which also gives the error a broken file deserves.
"""
from __future__ import annotations

import array
import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

from .bpe_unicode import nfc

# GPT-2's pre-tokenizer regex (ByteLevel with use_regex), as `tokenizers` spells it.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# kind flags, one byte per id
PRESENT, SPECIAL, ODD = 1, 2, 4   # ODD: the token stands for its own UTF-8 (every token of a
                                  # SentencePiece file; in a byte-level one, a token with characters
                                  # outside the byte alphabet, as tokenizers' ByteLevel decoder does)
SPACE = "\u2581"                  # SentencePiece's stand-in for a space


def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value: printable Latin-1 maps to itself, the rest
    (controls, space, 0x7f-0xa0, soft hyphen) to U+0100 onwards, in byte order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return tuple(chars)


ALPHABET = byte_alphabet()
# byte-level string -> latin-1 string of its bytes; other characters become one latin-1 cannot encode
_TO_BYTES = {ord(c): b for b, c in enumerate(ALPHABET)} | {
    c: 0x10FFFF for c in range(256) if chr(c) not in ALPHABET}
FROM_BYTES = {b: c for b, c in enumerate(ALPHABET)}     # latin-1 string of bytes -> byte-level


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for, or None if it has a character outside the alphabet."""
    try:
        return token.translate(_TO_BYTES).encode("latin-1")
    except UnicodeEncodeError:
        return None


ADDED_KEYS = ("id", "content", "special", "normalized", "single_word", "lstrip", "rstrip")


class UnsupportedTokenizer(Exception):
    """The tokenizer.json has a shape the lean tokenizer does not reproduce exactly."""


@dataclass
class Tables:
    blob: bytes              # every id's bytes, back to back
    offsets: np.ndarray      # (V+1,) int32: id i is blob[offsets[i]:offsets[i+1]]
    kind: np.ndarray         # (V,) uint8: PRESENT | SPECIAL | ODD flags
    index_hash: np.ndarray   # (N,) int64, sorted: ``key`` of each model-vocab token string
    index_id: np.ndarray     # (N,) int32: its id
    merge_keys: np.ndarray   # (M,) int64, sorted: left id * V + right id
    merge_rank: np.ndarray   # (M,) int32: the merge's position in the merges list
    merge_new: np.ndarray    # (M,) int32: id of the merged token
    rest: dict               # the small rest: n_ids, nfc, ignore_merges, patterns, byte_ids, added


def token_string(t: Tables, tid: int) -> str:
    """The token string of an id that has one (byte-level form, or as is for an ODD one)."""
    b = t.blob[int(t.offsets[tid]):int(t.offsets[tid + 1])]
    return b.decode("utf-8") if t.kind[tid] & ODD else b.decode("latin-1").translate(FROM_BYTES)


def key(token: str) -> int:
    """The hash a token string is found by: of its UTF-8, since ``hash`` of a str hashes its
    internal buffer, which two strings of different widths can share ("er" and U+7265)."""
    return hash(_utf8(token))


def vocab_id(t: Tables, token: str) -> int | None:
    """The model-vocab id of ``token``, checked against its bytes (hashes may collide)."""
    h = key(token)
    hashes = memoryview(t.index_hash)          # bisect on it: a tenth of a searchsorted call's time
    i = bisect.bisect_left(hashes, h)
    while i < len(hashes) and hashes[i] == h:
        tid = int(t.index_id[i])
        if token_string(t, tid) == token:
            return tid
        i += 1
    return None


# ---------------------------------------------------------------------------- reading

_STRING = rb'"((?:[^"\\]|\\.)*)"'
_VOCAB_AT = re.compile(rb'"vocab"\s*:\s*\{')
_MERGES_AT = re.compile(rb'"merges"\s*:\s*\[')
_VOCAB_ENTRY = re.compile(rb"\s*" + _STRING + rb"\s*:\s*(\d+)\s*([,}])", re.DOTALL)
_MERGE_STRING = re.compile(rb"\s*" + _STRING + rb"\s*([,\]])", re.DOTALL)
_MERGE_PAIR = re.compile(rb"\s*\[\s*" + _STRING + rb"\s*,\s*" + _STRING + rb"\s*\]\s*([,\]])", re.DOTALL)
_EMPTY = re.compile(rb"\s*[}\]]")


def _unescape(raw: bytes) -> str:
    """A JSON string's text from between its quotes, when it has backslash escapes."""
    return json.loads(b'"' + raw + b'"')


def _find(data: bytes, pattern: re.Pattern, what: str) -> int:
    """Where the one value of member ``what`` starts (its opening bracket)."""
    found = list(pattern.finditer(data))
    if len(found) != 1:
        raise UnsupportedTokenizer(f"{len(found)} '{what}' members where one was expected")
    return found[0].end() - 1


def _scan_vocab(data: bytes, start: int):
    """(token strings' hashes, ids, bytes blob in file order, lengths, ids of odd tokens, end offset) as
    a byte-level file spells them, and (blob, lengths) of the tokens' own UTF-8 (a SentencePiece
    file's, which shape the file has is known only once the rest is parsed)."""
    hashes, ids, lengths, lengths8 = array.array("q"), array.array("q"), array.array("q"), array.array("q")
    blob, blob8, odd = bytearray(), bytearray(), array.array("q")
    pos = start + 1
    if _EMPTY.match(data, pos):
        return hashes, ids, blob, lengths, odd, (blob8, lengths8), _EMPTY.match(data, pos).end()
    while True:
        m = _VOCAB_ENTRY.match(data, pos)
        if m is None:
            raise UnsupportedTokenizer(f"unexpected text in model.vocab at byte {pos}")
        raw, tid, end = m.groups()
        plain = b"\\" not in raw              # then the file's bytes are the token's UTF-8
        tok = raw.decode("utf-8") if plain else _unescape(raw)
        tid = int(tid)
        b, b8 = token_bytes(tok), raw if plain else tok.encode("utf-8")
        if b is None:
            odd.append(tid)
            b = b8
        hashes.append(hash(b8))                 # its key
        ids.append(tid)
        lengths.append(len(b))
        lengths8.append(len(b8))
        blob += b
        blob8 += b8
        pos = m.end()
        if end == b"}":
            return hashes, ids, blob, lengths, odd, (blob8, lengths8), pos


def _scan_merges(data: bytes, start: int):
    """(``key`` of left, right and merged token strings, end offset); their order is the rank.
    Hashed from the file's bytes: a string without escapes is its UTF-8 there."""
    left, right, merged = array.array("q"), array.array("q"), array.array("q")
    pos = start + 1
    if _EMPTY.match(data, pos):
        return left, right, merged, _EMPTY.match(data, pos).end()
    while True:
        m = _MERGE_PAIR.match(data, pos)
        if m is not None:
            a, b, end = m.groups()
            a = a if b"\\" not in a else _utf8(_unescape(a))
            b = b if b"\\" not in b else _utf8(_unescape(b))
        else:
            m = _MERGE_STRING.match(data, pos)
            if m is None:
                raise UnsupportedTokenizer(f"unexpected text in model.merges at byte {pos}")
            raw, end = m.groups()
            parts = (raw if b"\\" not in raw else _utf8(_unescape(raw))).split(b" ")
            if len(parts) != 2:
                raise UnsupportedTokenizer(f"malformed merge {m.group(1)!r}")
            a, b = parts
        left.append(hash(a))
        right.append(hash(b))
        merged.append(hash(a + b))
        pos = m.end()
        if end == b"]":
            return left, right, merged, pos


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _split_file(data: bytes):
    """(the file parsed without its vocab and merges, the vocab scan, the merges scan)."""
    v0, m0 = _find(data, _VOCAB_AT, "vocab"), _find(data, _MERGES_AT, "merges")
    try:
        vocab, merges = _scan_vocab(data, v0), _scan_merges(data, m0)
    except ValueError as e:     # a bad escape, invalid UTF-8, a lone surrogate
        raise UnsupportedTokenizer(f"a vocab or merges string it cannot read: {e}") from None
    (a0, a1, a), (b0, b1, b) = sorted([(v0, vocab[-1], b"{}"), (m0, merges[-1], b"[]")])
    if a1 > b0:
        raise UnsupportedTokenizer("model.vocab and model.merges overlap")
    try:
        spec = json.loads(data[:a0] + a + data[a1:b0] + b + data[b1:])
    except ValueError as e:
        raise UnsupportedTokenizer(f"not JSON once vocab and merges are cut out: {e}") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("vocab") != {} or model.get("merges") != []:
        raise UnsupportedTokenizer("vocab and merges are not members of the model")
    try:
        spm = _check(spec)
    except (AttributeError, KeyError, TypeError) as e:
        raise UnsupportedTokenizer(f"unexpected tokenizer.json layout ({type(e).__name__}: {e})") from None
    return spec, spm, vocab, merges


def _in_id_order(ids: np.ndarray, pieces: bytearray, lengths: np.ndarray, n: int):
    """(blob, offsets (n+1,)) of byte strings given in any id order; ids without one are empty."""
    by_id = np.zeros(n, np.int64)
    by_id[ids] = lengths
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(by_id, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise UnsupportedTokenizer("over 2 GiB of token bytes")
    if np.all(ids[1:] > ids[:-1]):          # as tokenizers writes them: nothing to move
        return bytes(pieces), offsets.astype(np.int32)
    src = np.zeros(n, np.int64)
    src[ids] = np.cumsum(lengths) - lengths
    gather = np.repeat(src - offsets[:-1], by_id) + np.arange(offsets[-1])
    return np.frombuffer(pieces, np.uint8)[gather].tobytes(), offsets.astype(np.int32)


def read_tables(path: str | Path) -> Tables:
    """The lean tables of the tokenizer.json at ``path``, or :class:`UnsupportedTokenizer`."""
    spec, spm, (hashes, ids, pieces, lengths, odd, utf8, _), (left, right, merged, _) = _split_file(
        Path(path).read_bytes())
    if spm:                      # every token is its own text
        pieces, lengths = utf8
    del utf8
    ids_np = np.frombuffer(ids, np.int64)
    by_value = np.sort(ids_np)
    if np.any(by_value[1:] == by_value[:-1]):
        raise UnsupportedTokenizer("the vocabulary gives one id to two tokens")
    del by_value
    added = [t for t in spec.get("added_tokens", []) if t["content"]]
    n = max([int(ids_np.max()) if len(ids_np) else -1, *(t["id"] for t in added)]) + 1
    if n > 2 * (len(ids_np) + len(added)) + 1024 or min((t["id"] for t in added), default=0) < 0:
        raise UnsupportedTokenizer(f"ids up to {n - 1} for {len(ids_np)} tokens (the arrays are per id)")

    kind = np.zeros(n, np.uint8)
    kind[ids_np] = PRESENT | (ODD if spm else 0)
    if not spm:
        kind[np.frombuffer(odd, np.int64)] |= ODD
    new_ids = []                 # added tokens that are not in the vocab: their bytes after the rest
    for t in added:
        if not kind[t["id"]] & PRESENT:
            b = None if spm else token_bytes(t["content"])
            kind[t["id"]] = PRESENT | (ODD if b is None else 0)
            b = b if b is not None else t["content"].encode("utf-8")
            new_ids.append(t["id"])
            pieces += b
            lengths.append(len(b))
        if t["special"]:
            kind[t["id"]] |= SPECIAL
    all_ids = np.concatenate([ids_np, np.array(new_ids, np.int64)])
    blob, offsets = _in_id_order(all_ids, pieces, np.frombuffer(lengths, np.int64), n)
    del pieces, all_ids

    index_hash = np.frombuffer(hashes, np.int64)
    order = np.argsort(index_hash, kind="stable")
    index_hash, index_id = index_hash[order], ids_np[order].astype(np.int32)
    del hashes, order, ids_np
    if np.any(index_hash[1:] == index_hash[:-1]):
        # merges found by hash alone below would be ambiguous (about 1 process in 10^9)
        raise UnsupportedTokenizer("two vocabulary tokens share a hash")
    tables = Tables(blob=blob, offsets=offsets, kind=kind, index_hash=index_hash, index_id=index_id,
                    merge_keys=np.zeros(0, np.int64), merge_rank=np.zeros(0, np.int32),
                    merge_new=np.zeros(0, np.int32), rest={})
    _add_merges(tables, left, right, merged)
    _add_rest(tables, spec, added, spm)
    return tables


def _ids_of(t: Tables, hashes: array.array, what: str) -> np.ndarray:
    h = np.frombuffer(hashes, np.int64)
    i = np.minimum(np.searchsorted(t.index_hash, h), max(len(t.index_hash) - 1, 0))
    if len(h) and (not len(t.index_hash) or np.any(t.index_hash[i] != h)):
        raise UnsupportedTokenizer(f"a merge's {what} token is not in the vocabulary")
    return t.index_id[i].astype(np.int64)


def _add_merges(t: Tables, left: array.array, right: array.array, merged: array.array) -> None:
    n = len(t.kind)
    keys = _ids_of(t, left, "left") * n + _ids_of(t, right, "right")
    new = _ids_of(t, merged, "merged").astype(np.int32)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    # a pair listed twice keeps its last rank (tokenizers collects the list into a hash map)
    last = np.ones(len(keys), bool)
    last[:-1] = keys[1:] != keys[:-1]
    order = order[last]
    t.merge_keys, t.merge_rank, t.merge_new = keys[last], order.astype(np.int32), new[order]


def _add_rest(t: Tables, spec: dict, added: list[dict], spm: bool) -> None:
    model = spec["model"]
    byte_ids = [vocab_id(t, f"<0x{b:02X}>" if spm else c) for b, c in enumerate(ALPHABET)]
    if spm and None in byte_ids:
        raise UnsupportedTokenizer("a byte-fallback vocabulary without all 256 <0xNN> pieces")
    if model.get("unk_token") is not None and None in byte_ids:
        raise UnsupportedTokenizer("an unknown token stands in for bytes missing from the vocabulary")
    # tokenizers ignores the ids written beside added tokens and numbers them itself; where its
    # numbering disagrees with the file, let it decide
    next_id, seen = len(t.index_id), set()
    in_vocab = np.zeros(len(t.kind) + len(added), bool)
    in_vocab[t.index_id] = True
    for a in added:
        if a["content"] in seen:
            raise UnsupportedTokenizer(f"added token {a['content']!r} appears twice")
        seen.add(a["content"])
        tid = vocab_id(t, a["content"])
        if tid is None:
            tid, next_id = next_id, next_id + 1
            if in_vocab[tid]:
                raise UnsupportedTokenizer(f"added token {a['content']!r} would share id {tid} with a vocab token")
        if tid != a["id"]:
            raise UnsupportedTokenizer(f"added token {a['content']!r} would get id {tid}, not {a['id']}")
    t.rest = {"n_ids": len(t.kind), "spm": spm, "nfc": not spm and spec.get("normalizer") is not None,
              "ignore_merges": bool(model.get("ignore_merges")),
              "patterns": [] if spm else pre_tokenizer_patterns(spec.get("pre_tokenizer")),
              "byte_ids": [-1 if i is None else i for i in byte_ids],   # byte value -> its token's id
              "added": [{k: a[k] for k in ADDED_KEYS} for a in added]}


# ---------------------------------------------------------------------------- shapes

def pre_tokenizer_patterns(pre: dict | None) -> list[tuple[str, bool]]:
    """The regexes a supported pre-tokenizer splits with, in order (each match isolated), each
    with whether tokenizers runs it in Oniguruma (Split, ByteLevel) or with Rust's tables (Digits)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if not steps or not steps[-1] or steps[-1].get("type") != "ByteLevel":
        raise UnsupportedTokenizer("the pre-tokenizer does not end with ByteLevel")
    patterns = []
    for step in steps[:-1]:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise UnsupportedTokenizer("a Split pre-tokenizer that is not Isolated or is inverted")
            if "Regex" in pattern:
                patterns.append((pattern["Regex"], True))
            elif "String" in pattern:
                patterns.append((regex.escape(pattern["String"]), True))
            else:
                raise UnsupportedTokenizer(f"Split pattern {pattern!r}")
        elif kind == "Digits":   # Rust's char::is_numeric: Nd, Nl and No
            patterns.append((r"\p{N}" if step.get("individual_digits") else r"\p{N}+", False))
        else:
            raise UnsupportedTokenizer(f"pre-tokenizer step {kind!r}")
    last = steps[-1]
    if last.get("add_prefix_space"):
        raise UnsupportedTokenizer("ByteLevel with add_prefix_space")
    if last.get("use_regex", True):
        patterns.append((GPT2_PATTERN, True))
    for p, _ in patterns:
        try:
            regex.compile(p)
        except regex.error as e:
            raise UnsupportedTokenizer(f"regex {p!r}: {e}") from None
    return patterns


# a SentencePiece BPE file as storage.gguf_tokenizer writes it: these members exactly
SPM_SHAPE = {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
             "pre_tokenizer": None, "post_processor": None,
             "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": SPACE},
                                                           "content": " "},
                                                          {"type": "ByteFallback"}, {"type": "Fuse"}]}}


def _check(spec: dict) -> bool:
    """Everything but vocab and merges in a shape the lean tokenizer reproduces; whether it is
    the SentencePiece one (``SPM_SHAPE``, byte fallback) rather than byte-level."""
    model = spec["model"]
    if model.get("type", "BPE") != "BPE":
        raise UnsupportedTokenizer(f"model type {model.get('type')!r}")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UnsupportedTokenizer(f"BPE {key}")
    if spec.get("truncation") or spec.get("padding"):
        raise UnsupportedTokenizer("truncation or padding")
    if model.get("byte_fallback"):
        if any(spec.get(k) != v for k, v in SPM_SHAPE.items()) or model.get("ignore_merges"):
            raise UnsupportedTokenizer("BPE byte_fallback outside the SentencePiece shape of storage.gguf_tokenizer")
        _check_added(spec, None)
        return True
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise UnsupportedTokenizer(f"normalizer {norm.get('type')!r}")
    pre_tokenizer_patterns(spec.get("pre_tokenizer"))
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedTokenizer("the decoder is not ByteLevel")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":
        raise UnsupportedTokenizer(f"post-processor {post.get('type')!r}")
    _check_added(spec, norm)
    return False


def _check_added(spec: dict, norm: dict | None) -> None:
    for t in spec.get("added_tokens", []):
        if not set(ADDED_KEYS) <= set(t) or not isinstance(t["id"], int) or not isinstance(t["content"], str):
            raise UnsupportedTokenizer(f"added token {t!r} lacks one of {', '.join(ADDED_KEYS)}")
        if norm is not None and t.get("normalized", True) and nfc(t["content"]) != t["content"]:
            raise UnsupportedTokenizer(f"added token {t['content']!r} changes under NFC")
        if norm is None and spec.get("normalizer") is not None and t["normalized"]:
            raise UnsupportedTokenizer(f"added token {t['content']!r} is matched on the normalized text")


def unsupported_reason(path: str | Path) -> str | None:
    """Why the lean tokenizer cannot reproduce the tokenizer.json at ``path``, or None if it can."""
    try:
        read_tables(path)
    except UnsupportedTokenizer as e:
        return str(e)
    return None
