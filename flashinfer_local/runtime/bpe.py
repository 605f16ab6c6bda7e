"""BPE encoding and decoding, in a few MiB instead of the ~45-300 MiB of HF ``tokenizers``.

The ids are the ones ``tokenizers`` gives, for the ``tokenizer.json`` shapes our bundles carry
(byte-level: GPT-2, SmolLM2, Qwen2 and Llama 3 style files; SentencePiece BPE: Gemma's, rebuilt
from its GGUF, :class:`SentencePieceBPE`); :mod:`.bpe_tables` reads the file into arrays and names
anything else (:class:`UnsupportedTokenizer`), and the caller then uses ``tokenizers``.
Encoding follows ``tokenizers``' own order:

1. added tokens are cut out of the text, leftmost-longest: first those matched on the raw text
   (``normalized: false``), then, in each normalized remaining piece, the normalized ones, with
   their ``single_word`` / ``lstrip`` / ``rstrip`` rules;
2. each remaining piece is normalized (nothing, or NFC) and split by the pre-tokenizer's regexes
   (Split, Digits, ByteLevel's GPT-2 regex), every match and every gap its own word; NFC and the
   regexes' character classes are tokenizers' own, Unicode versions included (:mod:`.bpe_unicode`);
3. each word's UTF-8 bytes go through the BPE merges, lowest rank first, leftmost among equals.

Decoding joins the ids' bytes and replaces invalid UTF-8 with U+FFFD, as ``tokenizers``' ByteLevel
decoder does.

A SentencePiece file differs in three steps: the text is normalized by writing spaces as U+2581
and is not split (each piece between added tokens is one word); a word's symbols are its
characters' pieces, or for a character without one its UTF-8 bytes' ``<0xNN>`` pieces (byte
fallback); decoding writes U+2581 back as a space and joins each run of byte pieces into text, a
run that is not valid UTF-8 as one U+FFFD per byte (tokenizers' ByteFallback decoder).
"""
from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import regex

from .bpe_tables import (FROM_BYTES, PRESENT, SPACE, SPECIAL, Tables, UnsupportedTokenizer, read_tables,
                         token_string, unsupported_reason, vocab_id)
from .bpe_unicode import nfc, onig_view

__all__ = ["ByteLevelBPE", "SentencePieceBPE", "UnsupportedTokenizer", "load", "unsupported_reason"]

# `tokenizers` tests added tokens' surroundings with the Rust regex crate's Unicode classes:
# \w is Alphabetic, marks, decimal digits, connector punctuation and joiners; \s is White_Space.
_WORD_CHAR = regex.compile(r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]")
_SPACE_CHAR = regex.compile(r"\p{White_Space}")
_SPACES = regex.compile(r"\p{White_Space}*")

_CACHE_WORDS = 4096      # words whose ids are remembered (a prompt repeats most of its words)
_BYTE_PIECE = regex.compile(rb"<0x(\+?[0-9A-Fa-f]{1,2})>")
_CACHE_WORD_LEN = 64     # longer words are not remembered


def load(path: str | Path) -> ByteLevelBPE:
    """The lean tokenizer of the ``tokenizer.json`` at ``path``; :class:`UnsupportedTokenizer`
    names what it lacks (then use HF ``tokenizers``)."""
    tables = read_tables(path)
    return (SentencePieceBPE if tables.rest["spm"] else ByteLevelBPE)(tables)


def trie_pattern(words) -> str:
    """A regex that matches any of ``words``, the longest of those that match at a position: their
    trie, each node's continuations tried before ending there (tokenizers matches leftmost-longest,
    with Aho-Corasick; a plain alternation of Gemma's 6,414 added tokens is tried one by one)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        alts = [regex.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        if not alts:
            return ""
        return "(?:" + "|".join(alts) + ")" + ("?" if "" in node else "")
    return pattern(trie)


class _AddedTokens:
    """Cuts one matching set of added tokens (the raw-text or the normalized one) out of a text."""

    def __init__(self, tokens: list[dict]):
        self._tokens = {t["content"]: t for t in tokens}
        self._re = regex.compile(trie_pattern(self._tokens)) if tokens else None

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` as (piece, None) and (token text, id) in order, as tokenizers' find_matches."""
        if self._re is None or not text:
            return [(text, None)]
        out, done = [], 0
        for m in self._re.finditer(text):
            start, stop = m.span()
            tok = self._tokens[m.group()]
            if tok["single_word"] and ((start and _WORD_CHAR.match(text, start - 1))
                                             or _WORD_CHAR.match(text, stop)):
                continue        # part of a longer word
            if tok["lstrip"]:     # the spaces before it, back to the previous token
                while start > done and _SPACE_CHAR.match(text, start - 1):
                    start -= 1
            if tok["rstrip"]:
                stop = _SPACES.match(text, stop).end()
            if done < start:
                out.append((text[done:start], None))
            out.append((text[start:stop], tok["id"]))
            done = stop
        if done != len(text):
            out.append((text[done:], None))
        return out


class ByteLevelBPE:
    """Encoder and decoder of a supported byte-level BPE ``tokenizer.json`` (made by :func:`load`).

    Held (V ids, M merges): the tokens' bytes as one blob with int64 offsets, a flags byte per id,
    the vocab's string hashes (sorted int64) with their int32 ids, and the merges as sorted int64
    keys ``left * V + right`` with int32 ranks and merged ids; no Python object per token.
    """

    def __init__(self, tables: Tables):
        self._t = t = tables
        self.n_ids: int = t.rest["n_ids"]
        self._blob, self._merge_keys = t.blob, t.merge_keys
        # memoryviews: indexing one gives a Python int, several times faster than a numpy scalar
        self._off_mv, self._kind_mv = memoryview(t.offsets), memoryview(t.kind)
        self._keys_mv, self._rank_mv, self._new_mv = (
            memoryview(t.merge_keys), memoryview(t.merge_rank), memoryview(t.merge_new))
        self._nfc, self._ignore_merges = t.rest["nfc"], t.rest["ignore_merges"]
        self._splitters = [(regex.compile(p), onig) for p, onig in t.rest["patterns"]]
        self._byte_ids: list[int] = t.rest["byte_ids"]
        added = t.rest["added"]
        self._added = {a["content"]: a["id"] for a in added}   # few: tens to a few thousands
        self._raw_added = _AddedTokens([a for a in added if not a["normalized"]])
        self._norm_added = _AddedTokens([a for a in added if a["normalized"]])
        self._cache: dict[str, tuple[int, ...]] = {}

    def nbytes(self) -> int:
        """Bytes held in the tables (the arrays and the blob; the small dicts and regexes aside)."""
        t = self._t
        return len(t.blob) + sum(a.nbytes for a in (t.offsets, t.kind, t.index_hash, t.index_id,
                                                     t.merge_keys, t.merge_rank, t.merge_new))

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``: an added token's content, or a vocab string."""
        tid = self._added.get(token)
        return tid if tid is not None else vocab_id(self._t, token)

    def vocabulary(self) -> dict[str, int]:
        """Token string -> id, added tokens included (built on each call; nothing is kept)."""
        vocab = {token_string(self._t, tid): tid for tid in self._t.index_id.tolist()}
        vocab.update(self._added)
        return vocab

    # ------------------------------------------------------------------ encode

    def _normalize(self, text: str) -> str:
        return nfc(text) if self._nfc else text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` changes nothing: the supported
        post-processors (none, ByteLevel) add no tokens."""
        ids: list[int] = []
        for piece, tid in self._raw_added.split(text):
            if tid is not None:
                ids.append(tid)
                continue
            for part, tid in self._norm_added.split(self._normalize(piece)):
                if tid is not None:
                    ids.append(tid)
                else:
                    for word in self._words(part):
                        ids.extend(self._word_ids(word))
        return ids

    def _words(self, text: str) -> list[str]:
        """The pre-tokenizer's words: each regex in turn splits every piece, matches and gaps kept.
        An Oniguruma regex sees the text with the letters it does not know replaced (bpe_unicode)."""
        if not text:
            return []
        pieces = [(text, onig_view(text))]     # the same length, position for position
        for rx, onig in self._splitters:
            out = []
            for piece, seen in pieces:
                done = 0
                for m in rx.finditer(seen if onig else piece):
                    start, stop = m.span()
                    if start > done:
                        out.append((piece[done:start], seen[done:start]))
                    if stop > start:
                        out.append((piece[start:stop], seen[start:stop]))
                    done = max(done, stop)
                if done < len(piece):
                    out.append((piece[done:], seen[done:]))
            pieces = out
        return [piece for piece, _ in pieces]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        cache = self._cache
        hit = cache.get(word)
        if hit is not None:
            return hit
        raw = word.encode("utf-8")
        tid = vocab_id(self._t, raw.decode("latin-1").translate(FROM_BYTES)) if self._ignore_merges else None
        if tid is not None:
            ids = (tid,)
        else:
            ids = tuple(self._merge(self._symbols(word, raw)))
        if len(word) <= _CACHE_WORD_LEN:
            if len(cache) >= _CACHE_WORDS:
                del cache[next(iter(cache))]     # the oldest entry
            cache[word] = ids
        return ids

    def _symbols(self, word: str, raw: bytes) -> list[int]:
        """A word's symbols before any merge: its UTF-8 bytes' tokens (bytes without one dropped)."""
        return [i for i in map(self._byte_ids.__getitem__, raw) if i >= 0]

    def _pair(self, a: int, b: int) -> tuple[int, int] | None:
        """(rank, merged id) of the merge of ``a`` then ``b``, or None."""
        key = a * self.n_ids + b
        i = int(self._merge_keys.searchsorted(key))
        if i < len(self._keys_mv) and self._keys_mv[i] == key:
            return self._rank_mv[i], self._new_mv[i]
        return None

    def _merge(self, syms: list[int]) -> list[int]:
        """Apply the merges to one word's symbols, lowest rank first, leftmost first among equals.

        A heap of (rank, position, left, right, merged) candidates, as tokenizers keeps: a popped
        candidate whose two symbols have since changed is stale and dropped. Symbols merged into
        their left neighbour are marked -1; ``nxt``/``prv`` link the live ones.
        """
        n = len(syms)
        if n < 2:
            return syms
        pair = self._pair
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            m = pair(syms[i], syms[i + 1])
            if m is not None:
                heap.append((m[0], i, syms[i], syms[i + 1], m[1]))
        heapq.heapify(heap)
        while heap:
            _, pos, a, b, new = heapq.heappop(heap)
            right = nxt[pos]
            if syms[pos] != a or right >= n or syms[right] != b:
                continue
            syms[pos], syms[right] = new, -1
            after = nxt[pos] = nxt[right]
            if after < n:
                prv[after] = pos
                m = pair(new, syms[after])
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, new, syms[after], m[1]))
            before = prv[pos]
            if before >= 0:
                m = pair(syms[before], new)
                if m is not None:
                    heapq.heappush(heap, (m[0], before, syms[before], new, m[1]))
        return [s for s in syms if s >= 0]

    # ------------------------------------------------------------------ decode

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``: their bytes joined, invalid UTF-8 as U+FFFD; ids of no token are
        dropped, and special tokens too when ``skip_special_tokens``. Called per generated token
        on short windows, so a plain loop over memoryviews (no numpy per call)."""
        off, kind, blob, n = self._off_mv, self._kind_mv, self._blob, self.n_ids
        drop = SPECIAL if skip_special_tokens else 0
        out = bytearray()
        for i in ids:
            if 0 <= i < n and kind[i] & PRESENT and not kind[i] & drop:
                out += blob[off[i]:off[i + 1]]
        return out.decode("utf-8", "replace")


class SentencePieceBPE(ByteLevelBPE):
    """Encoder and decoder of the SentencePiece BPE file ``storage.gguf_tokenizer`` writes (module
    docstring): the same tables, every token its own text."""

    def __init__(self, tables: Tables):
        super().__init__(tables)
        # byte piece id -> its byte: every token spelled <0xNN> (tokenizers' ByteFallback reads the
        # hex of any such token, Rust's from_str_radix, a leading + included)
        lengths = np.diff(tables.offsets)
        self._byte_of = {}
        for tid in np.flatnonzero((lengths == 6) & (tables.kind & PRESENT > 0)).tolist():
            m = _BYTE_PIECE.fullmatch(self._blob, int(tables.offsets[tid]), int(tables.offsets[tid + 1]))
            if m is not None:
                self._byte_of[tid] = int(m.group(1), 16)
        self._chars: dict[str, tuple[int, ...]] = {}      # a character -> its symbols (seen ones)

    def _normalize(self, text: str) -> str:
        return text.replace(" ", SPACE)

    def _symbols(self, word: str, raw: bytes) -> list[int]:
        out: list[int] = []
        chars = self._chars
        for ch in word:
            ids = chars.get(ch)
            if ids is None:
                tid = vocab_id(self._t, ch)
                ids = (tid,) if tid is not None else tuple(self._byte_ids[b] for b in ch.encode("utf-8"))
                if len(chars) < _CACHE_WORDS * 16:
                    chars[ch] = ids
            out.extend(ids)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        off, kind, blob, n = self._off_mv, self._kind_mv, self._blob, self.n_ids
        drop = SPECIAL if skip_special_tokens else 0
        byte_of = self._byte_of
        out, run = [], bytearray()
        for i in ids:
            if not (0 <= i < n and kind[i] & PRESENT) or kind[i] & drop:
                continue
            b = byte_of.get(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                out.append(_byte_run(run))
                run = bytearray()
            out.append(blob[off[i]:off[i + 1]].decode("utf-8").replace(SPACE, " "))
        if run:
            out.append(_byte_run(run))
        return "".join(out)


def _byte_run(run: bytearray) -> str:
    """A run of byte pieces as text; not valid UTF-8: one U+FFFD per byte, as tokenizers does."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
