"""The lean BPE (runtime/bpe.py) against HF ``tokenizers``, its second implementation: the same ids
on fuzzed text, the same text back from any ids, for every vocabulary at hand (the tiny trained one,
SmolLM2's, Qwen2.5's when its GGUF is here, Gemma 3's SentencePiece vocabulary as convert rebuilds
it) and for edited copies of SmolLM2's file that exercise the shapes and added-token rules the real
files do not use."""
from __future__ import annotations

import json
import random
import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from flashinfer_local.runtime import bpe
from flashinfer_local.runtime.bpe_tables import ALPHABET
from flashinfer_local.runtime.bpe_unicode import nfc, onig_view
from flashinfer_local.runtime.tokenizer import IncrementalDecoder, Tokenizer, load_text_tokenizer
from flashinfer_local.workflows.fetch import models_dir
from storage.reader import Bundle

QWEN_GGUFS = ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct-awq.gguf")

# pieces the fuzzer strings together: what the pre-tokenizer regexes and the merges care about
FRAGMENTS = ["Hello", "WORLD", " the", "def f(x):\n", "    return x * 2\n", "\t", "  ", "   \n\n  ", "\r\n",
             "0", "42", "3.14159", "1,000,000", "x2y", "'s", "'S", "'Re", "'ll", "DON'T", "we've", "ſ",
             "日本語のテキスト", "中文", "한국어", "🙂", "👍🏽", "🇯🇵", "\u200d", "e\u0301", "a\u0308\u0301",
             "\u1100\u1161", "Å", "ﬁ", "²½Ⅻ٣३", "\x00", "\x1f", "\x7f", "\x85", "\xa0", "\u00ad", "\u2028",
             "\u3000", "\ufeff", "<", "|", ">", "<|", "|>", "{}", "\\n", "\"", "é"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def fuzz_text(specials):
    return st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(specials), TEXT),
                    max_size=24).map("".join)


class Pair:
    """The lean tokenizer and tokenizers, both loaded from one file."""

    def __init__(self, path):
        self.path, self.lean, self.hf = path, bpe.load(path), HFTokenizer.from_file(str(path))
        self.added = [t.content for t in self.hf.get_added_tokens_decoder().values()]
        self.nfc = self.lean._nfc
        self.spm = isinstance(self.lean, bpe.SentencePieceBPE)
        # bytes with no token of their own (SmolLM2 lacks 0x04, 0x13, 0xf1, ...): both drop them
        self.missing = set() if self.spm else {b for b in range(256) if self.hf.token_to_id(ALPHABET[b]) is None}

    def check(self, text: str) -> list[int]:
        ids = self.lean.encode(text)
        assert ids == self.hf.encode(text).ids, repr(text)
        for skip in (True, False):
            assert self.lean.decode(ids, skip) == self.hf.decode(ids, skip_special_tokens=skip), repr(text)
        return ids


def _qwen_json(tmp_path_factory):
    from storage.gguf_source import GGUFSource
    for name in QWEN_GGUFS:
        if (models_dir() / name).is_file():
            with GGUFSource(models_dir() / name) as src:
                path = tmp_path_factory.mktemp("qwen_tok") / "tokenizer.json"
                path.write_text(src.tokenizer.tokenizer_json, encoding="utf-8")
                return path
    pytest.skip(f"no Qwen2.5 GGUF in {models_dir()} ({' or '.join(QWEN_GGUFS)})")


@pytest.fixture(scope="module", params=["tiny", "smollm2", "qwen2.5", "gemma3"])
def pair(request, tiny_ckpt, smollm_bundle, tmp_path_factory):
    if request.param == "tiny":
        return Pair(tiny_ckpt("llama") / "tokenizer.json")
    if request.param == "smollm2":
        return Pair(Bundle(smollm_bundle("f16")).tokenizer_file)
    if request.param == "gemma3":
        return Pair(request.getfixturevalue("gemma_tokenizer_json"))
    return Pair(_qwen_json(tmp_path_factory))


@pytest.fixture(scope="module")
def smollm_spec(smollm_bundle):
    return json.loads(Bundle(smollm_bundle("f16")).tokenizer_file.read_text(encoding="utf-8"))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_ids_and_text_match_tokenizers(pair, data):
    text = data.draw(fuzz_text(pair.added))
    back = pair.lean.decode(pair.check(text), skip_special_tokens=False)
    if pair.missing & set(text.encode()):
        return
    if pair.nfc:    # each piece between added tokens is normalized, so the text is, up to NFC
        assert unicodedata.normalize("NFC", back) == unicodedata.normalize("NFC", text)
    elif pair.spm:  # a written U+2581 decodes as the space it stands for
        assert back == text.replace("\u2581", " ")
    else:
        assert back == text


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_ids_decode_as_tokenizers_does(pair, data):
    n = pair.hf.get_vocab_size(with_added_tokens=True)
    ids = data.draw(st.lists(st.one_of(st.integers(0, n + 3), st.sampled_from([0, n - 1, n - 2])), max_size=12))
    for skip in (True, False):
        assert pair.lean.decode(ids, skip) == pair.hf.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_lookups_match(pair):
    assert pair.lean.vocabulary() == pair.hf.get_vocab(with_added_tokens=True)
    for token in [*pair.added, "Ġthe", "the", "zzzz-not-a-token", "Ġ"]:
        assert pair.lean.token_to_id(token) == pair.hf.token_to_id(token), token


def test_long_runs_and_words(pair):
    for text in [" " * 3000 + "x", "\n" * 500, "ab" * 2000, "7" * 300, "é" * 400 + "!"]:
        pair.check(text)


def test_byte_pieces_decode_as_tokenizers_does(gemma_tokenizer_json):
    """Runs of <0xNN> pieces join into text; a run that is not UTF-8 gives one U+FFFD per byte."""
    pair = Pair(gemma_tokenizer_json)
    b = [pair.hf.token_to_id(f"<0x{v:02X}>") for v in range(256)]
    word = pair.hf.token_to_id("\u2581the")
    for ids in ([b[0xE2], b[0x82], b[0xAC]], [b[0xE2], b[0x82]], [word, b[0xE2], word, b[0xE2], b[0x82], b[0xAC]],
                [b[0x41], b[0xFF], b[0x41]], [b[0xF0], b[0x9F], b[0x99], b[0x82], word]):
        for skip in (True, False):
            assert pair.lean.decode(ids, skip) == pair.hf.decode(ids, skip_special_tokens=skip), ids
    for text in ["\U0001f642 \u2603 x", "\x00\x01\x7f", "\u2581\u2581 a\u2581", "\n\n\n<start_of_turn>x", ""]:
        pair.check(text)


def test_the_engine_tokenizer_is_the_lean_one(smollm_bundle):
    tok = Tokenizer(Bundle(smollm_bundle("f16")))
    assert isinstance(tok._tok, bpe.ByteLevelBPE)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi there, 42 times!"}])
    d = IncrementalDecoder(tok)
    assert "".join(d.add(t) for t in ids) + d.flush() == tok.decode(ids)
    assert tok.eos_token_ids and all(isinstance(t, int) for t in tok.eos_token_ids)


def test_the_regexes_class_every_code_point_as_tokenizers_does():
    # Split and ByteLevel regexes run in Oniguruma, Digits with Rust's char::is_numeric; each has
    # its own Unicode version, and `regex` another (bpe_unicode bridges the gaps)
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    text = "".join(map(chr, cps))
    masked = onig_view(text)
    for pattern in (r"\p{L}", r"\p{N}", r"\s"):
        kept = pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text)
        onig, done = [], 0
        for _, (start, stop) in kept:
            onig += range(done, start)
            done = stop
        onig += range(done, len(cps))
        assert [m.start() for m in regex.finditer(pattern, masked)] == onig, pattern
    alternate = "".join(chr(c) + "a" for c in cps)       # a numeric character is a piece of its own
    rust = [start // 2 for _, (start, stop) in pre_tokenizers.Digits(True).pre_tokenize_str(alternate)
            if stop - start == 1 and start % 2 == 0]
    assert [m.start() for m in regex.finditer(r"\p{N}", text)] == rust


def test_nfc_is_the_one_tokenizers_computes():
    # its NFC tables are Unicode 9.0: newer marks do not reorder, newer compositions are not made
    cps = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    marks = regex.findall(r"[^\p{ccc=0}]", "".join(cps))
    seconds = regex.findall(r"\p{NFC_QC=Maybe}", "".join(cps))
    probes = (cps + [m + "\u0334" for m in marks] + ["\u0301" + m for m in marks]
              + ["a" + m + "\u0327" for m in marks + seconds]
              + [unicodedata.normalize("NFD", c) for c in cps if unicodedata.normalize("NFD", c) != c])
    hf = normalizers.NFC().normalize_str
    text = "|".join(probes)        # '|' composes with nothing and keeps the probes apart
    if nfc(text) != hf(text):
        assert [p for p in probes if nfc(p) != hf(p)] == []


# ---------------------------------------------------------------------------- edited SmolLM2 files

NEW_ADDED = [  # ids follow tokenizers' numbering: new contents get len(vocab), len(vocab) + 1, ...
    dict(content="<sw>", single_word=True, special=False, normalized=False),
    dict(content="[L]", lstrip=True, special=True, normalized=False),
    dict(content="[R]", rstrip=True, special=True, normalized=False),
    dict(content="[LR]", lstrip=True, rstrip=True, single_word=True, special=True, normalized=False),
    dict(content="naïve", special=False, normalized=True),
    dict(content="two words", special=False, normalized=True),     # a space: outside the byte alphabet
]
EDGE_TEXTS = ["<sw>", "x<sw>y", " <sw> ", "a_<sw>", "<sw>é", "[L]", "  \t[L]", "a [R]   b", "[R]\n\n",
              "[LR]", " \u3000[LR]\n ", "x[LR]", "naïve", "nai\u0308ve", "NAÏVE naïve", "two words",
              "the other the", "the", "<|im_start|>[L][R]<sw>", "ſ'S 'Ll", "Ⅻ²", " 12 345"]


def _variant(spec, tmp_path, name, **edit):
    spec = {**spec, **edit, "model": {**spec["model"], **edit.get("model", {})}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


def _with_added(spec):
    vocab = spec["model"]["vocab"]
    added = [dict(t) for t in spec["added_tokens"]]
    flags = dict(single_word=False, lstrip=False, rstrip=False)
    for i, t in enumerate(NEW_ADDED):
        added.append({**flags, **t, "id": len(vocab) + i})
    added.append({**flags, "content": "the", "id": vocab["the"], "single_word": True, "special": False,
                  "normalized": True})
    return added


def _fuzz_corpus(pair, n=150, seed=0):
    rng = random.Random(seed)
    pool = FRAGMENTS + pair.added + EDGE_TEXTS + [" ", "\n", "_", "a"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("name", ["gpt2_regex", "ignore_merges", "digits_runs", "added_flags",
                                  "legacy_merges", "escaped_shuffled"])
def test_edited_files_match_tokenizers(smollm_spec, tmp_path, name):
    s = smollm_spec
    if name == "gpt2_regex":
        path = _variant(s, tmp_path, name, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False,
                                                          "trim_offsets": True, "use_regex": True})
    elif name == "ignore_merges":
        path = _variant(s, tmp_path, name, model={"ignore_merges": True})
    elif name == "digits_runs":
        path = _variant(s, tmp_path, name, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": False},
            {"type": "Split", "pattern": {"String": "--"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    elif name == "added_flags":
        path = _variant(s, tmp_path, name, added_tokens=_with_added(s), normalizer={"type": "NFC"})
    elif name == "legacy_merges":
        path = _variant(s, tmp_path, name, model={"merges": [" ".join(m) for m in s["model"]["merges"]]})
    else:   # pretty-printed, every non-ASCII character escaped, vocab ids out of order
        items = list(s["model"]["vocab"].items())
        random.Random(1).shuffle(items)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**s, "model": {**s["model"], "vocab": dict(items)}}, indent=2))
    pair = Pair(path)
    for text in EDGE_TEXTS + _fuzz_corpus(pair):
        pair.check(text)
    if name in ("added_flags", "escaped_shuffled"):
        assert pair.lean.vocabulary() == pair.hf.get_vocab(with_added_tokens=True)


@pytest.mark.parametrize("edit,why", [
    (dict(normalizer={"type": "Lowercase"}), "normalizer"),
    (dict(model={"byte_fallback": True}), "byte_fallback"),
    (dict(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}), "ByteLevel"),
    (dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}),
     "add_prefix_space"),
    (dict(post_processor={"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                          "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                          "special_tokens": {}}), "post-processor"),
    (dict(added_tokens=[{"id": 7, "content": "<brand-new>", "special": True, "normalized": False,
                         "single_word": False, "lstrip": False, "rstrip": False}]), "would get id"),
])
def test_other_shapes_fall_back_to_tokenizers(tiny_ckpt, tmp_path, edit, why):
    spec = json.loads((tiny_ckpt("llama") / "tokenizer.json").read_text(encoding="utf-8"))
    path = _variant(spec, tmp_path, "other", **edit)
    assert why in bpe.unsupported_reason(path)
    with pytest.raises(bpe.UnsupportedTokenizer):
        bpe.load(path)
    assert not isinstance(load_text_tokenizer(path), bpe.ByteLevelBPE)
