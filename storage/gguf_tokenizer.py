"""Rebuild a Hugging Face ``tokenizers`` tokenizer from the vocabulary a GGUF file carries.

A GGUF has no ``tokenizer.json``: llama.cpp stores the token strings, their types, the BPE merges and
the name of the pre-tokenizer (``tokenizer.ggml.pre``) as metadata. Two families are supported:

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the normalizer, pre-tokenizer and BPE options
  are chosen per ``pre`` so that they are the ones the model's original ``tokenizer.json`` used;
- SentencePiece BPE (``"llama"``, as Gemma's files carry it): no merges, a score per piece. Encoding
  joins, again and again, the adjacent pair whose joined piece has the best score (llama.cpp's SPM
  tokenizer); a BPE whose merges are ranked by the score of the piece they make does the same, and
  characters outside the vocabulary become their UTF-8 bytes' ``<0xNN>`` pieces (byte fallback).
  Spaces are written as U+2581. Checked against a direct implementation of that rule on fuzzed text
  (tests/test_gemma3.py).
"""
from __future__ import annotations

import logging
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import CheckpointError, UnsupportedModelError

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused (padding rows such as "[PAD151665]"), 6 byte.
CONTROL, USER_DEFINED = 3, 4

# The Split regexes of the original tokenizer.json files (Llama 3 splits digits in runs of up to
# three, Qwen2 one by one). The contraction group is case-insensitive in both.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str):
    """Split on ``pattern`` (matches kept as pieces), then map bytes to the byte-level alphabet."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _smollm():
    # SmolLM's tokenizer.json: every digit on its own, then GPT-2's built-in regex.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> (pre-tokenizer factory, normalizer factory or None, BPE ignore_merges)
# ignore_merges: Llama 3's tokenizer.json (and llama.cpp for it) takes a whole pre-token that is in
# the vocabulary as one token before applying merges. Qwen2's tokenizer.json normalizes to NFC.
_PRE = {
    "smollm": (_smollm, None, False),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), normalizers.NFC, False),
    "deepseek-r1-qwen": (lambda: _split_then_bytes(_QWEN2_SPLIT), normalizers.NFC, False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), None, True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), None, True),
    "llama-v3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), None, True),
    "gpt2": (_gpt2, None, False),
    "default": (_gpt2, None, False),
}
SUPPORTED_PRE = tuple(_PRE)

_PLACEHOLDER = re.compile(r"^\[PAD\d+\]$")   # llama.cpp's filler for unassigned ids


def build_tokenizer_json(model: str, pre: str | None, tokens: list[str], token_types: list[int] | None,
                         merges: list[str], where: str = "GGUF") -> str:
    """The ``tokenizer.json`` text of a byte-level BPE tokenizer built from GGUF vocabulary metadata.

    ``tokens[i]`` is the string of id ``i`` (already in the byte-level alphabet, as llama.cpp's
    converter copies it from the HF vocab), ``merges`` are ``"left right"`` strings best-first.
    Control tokens become special added tokens and user-defined ones plain added tokens, so both are
    matched whole in text. No post-processor: BOS is added by the engine (``TokenizerInfo.add_bos``).
    """
    if model != "gpt2":
        raise UnsupportedModelError(
            f"{where}: tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)")
    pre = pre or "default"
    if pre not in _PRE:
        raise UnsupportedModelError(
            f"{where}: tokenizer pre-tokenizer '{pre}' is not supported "
            f"(supported: {', '.join(SUPPORTED_PRE)})")
    make_pre, make_norm, ignore_merges = _PRE[pre]

    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)        # a duplicate string keeps its first id
    if len(vocab) != len(tokens):
        logger.warning("%s: %d duplicate token strings in the vocabulary", where, len(tokens) - len(vocab))
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{where}: malformed BPE merge {m!r} (expected 'left right')")
        pairs.append((parts[0], parts[1]))

    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                  ignore_merges=ignore_merges))
    except Exception as e:           # tokenizers raises a bare Exception, e.g. a merge of unknown tokens
        raise CheckpointError(f"{where}: the tokenizer's vocabulary and merges do not fit together "
                              f"({str(e)[:100]}); the file is damaged, fetch or export it again") from None
    if make_norm is not None:
        tk.normalizer = make_norm()
    tk.pre_tokenizer = make_pre()
    tk.decoder = decoders.ByteLevel()

    special, user = _add_pieces(tk, tokens, token_types or [], len(vocab), where, skip=_PLACEHOLDER)
    logger.debug("%s: built BPE tokenizer (pre=%s, %d tokens, %d merges, %d special, %d added)",
                 where, pre, len(tokens), len(pairs), special, user)
    return tk.to_str()


def _add_pieces(tk: Tokenizer, tokens: list[str], types: list[int], n_vocab: int, where: str,
                skip: re.Pattern | None = None) -> tuple[int, int]:
    """Control tokens as special added tokens, user-defined ones (but ``skip``'s) as plain added
    tokens, both matched whole in the raw text -> how many of each."""
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and not (skip and skip.match(t))]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    if tk.get_vocab_size(with_added_tokens=True) != n_vocab:
        # every added token is a vocabulary string, so adding one must not create a new id
        raise CheckpointError(f"{where}: added tokens do not match the vocabulary")
    return len(special), len(user)


# Gemma's turn format, for files that carry no template (a base model's GGUF): a system message
# goes in front of the first user turn, the assistant's role is "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + ns.system"
    " + (m['content'] | trim) + '<end_of_turn>\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def build_spm_tokenizer_json(tokens: list[str], scores: list[float], token_types: list[int] | None,
                             add_space_prefix: bool, where: str = "GGUF") -> str:
    """The ``tokenizer.json`` text of a SentencePiece BPE vocabulary (module docstring): each
    normal piece gives a merge for every way it splits into two vocabulary pieces, ranked by the
    piece's score (best first; ties: shorter left part, then the parts' ids). Control pieces
    become special added tokens and user-defined ones (Gemma's runs of spaces and newlines) plain
    added tokens, both matched whole in the raw text first, as llama.cpp does."""
    if add_space_prefix:
        raise UnsupportedModelError(
            f"{where}: a SentencePiece vocabulary that adds a space prefix (Llama 2 style) is not supported "
            "yet (supported: Gemma's, without one)")
    if len(scores) != len(tokens) or (token_types is not None and len(token_types) != len(tokens)):
        raise CheckpointError(f"{where}: the tokenizer lists {len(tokens)} pieces but {len(scores)} scores; "
                              "the file is damaged, fetch or export it again")
    types = token_types or [1] * len(tokens)
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if not all(f"<0x{b:02X}>" in vocab for b in range(256)):
        raise UnsupportedModelError(f"{where}: the SentencePiece vocabulary has no byte pieces <0x00>..<0xFF>")
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] != 1 or vocab[tok] != i:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], k, vocab[a], vocab[b], a, b))
    ranked.sort(key=lambda m: m[:4])
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in ranked], fuse_unk=True,
                                  unk_token=next((t for t, ty in zip(tokens, types) if ty == 2),
                                                 "<unk>" if "<unk>" in vocab else None),
                                  byte_fallback=True))
    except Exception as e:
        raise CheckpointError(f"{where}: the tokenizer's vocabulary does not form a BPE ({str(e)[:100]}); "
                              "the file is damaged, fetch or export it again") from None
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    special, user = _add_pieces(tk, tokens, types, len(vocab), where)
    logger.debug("%s: built SentencePiece BPE tokenizer (%d pieces, %d merges, %d special, %d added)",
                 where, len(tokens), len(ranked), special, user)
    return tk.to_str()
