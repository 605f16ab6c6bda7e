"""Gemma 3: the SentencePiece vocabulary rebuilt from a GGUF, sliding-window attention (ring KV
caches), and the real gemma3-270m against transformers on the same GGUF."""
import heapq
import random

import pytest
import torch

from flashinfer_local.models.common import RING_MARGIN, KVCache
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import SamplingParams
from storage.config import ModelConfig
from storage.convert import convert
from storage.errors import UnsupportedModelError
from storage.gguf_tokenizer import build_spm_tokenizer_json
from tiny_models import SLIDING_WINDOW, reference_logits, reference_model

from conftest import gemma_gguf
from test_real_models import compare

GREEDY = SamplingParams(temperature=0)


# ---------------------------------------------------------------- the vocabulary

class SentencePieceReference:
    """llama.cpp's SPM tokenizer, written out directly: control and user-defined pieces are cut out
    of the text first (leftmost, longest), spaces become U+2581, and in each remaining fragment the
    adjacent pair whose joined piece is in the vocabulary with the best score is joined, again and
    again (ties: leftmost); characters left outside the vocabulary become their bytes' <0xNN> pieces."""

    def __init__(self, tokens, scores, types):
        self.id = {}
        for i, t in enumerate(tokens):
            self.id.setdefault(t, i)
        self.scores = scores
        self.whole = sorted({t for t, ty in zip(tokens, types) if ty in (3, 4)}, key=len, reverse=True)
        self.first = {}
        for t in self.whole:
            self.first.setdefault(t[0], []).append(t)

    def encode(self, text):
        ids, i, last = [], 0, 0
        while i < len(text):
            hit = next((t for t in self.first.get(text[i], ()) if text.startswith(t, i)), None)
            if hit is None:
                i += 1
                continue
            ids += self._fragment(text[last:i]) + [self.id[hit]]
            i = last = i + len(hit)
        return ids + self._fragment(text[last:])

    def _fragment(self, text):
        sym = list(text.replace(" ", "\u2581"))
        if not sym:
            return []
        nxt, prev = list(range(1, len(sym))) + [-1], list(range(-1, len(sym) - 1))
        heap = []

        def push(a, b):
            if a >= 0 and b >= 0 and (sym[a] + sym[b]) in self.id:
                heapq.heappush(heap, (-self.scores[self.id[sym[a] + sym[b]]], a, b, len(sym[a]) + len(sym[b])))
        for a in range(len(sym) - 1):
            push(a, a + 1)
        while heap:
            _, a, b, size = heapq.heappop(heap)
            if not sym[a] or not sym[b] or nxt[a] != b or len(sym[a]) + len(sym[b]) != size:
                continue
            sym[a], sym[b] = sym[a] + sym[b], ""
            nxt[a] = nxt[b]
            if nxt[b] >= 0:
                prev[nxt[b]] = a
            push(prev[a], a)
            push(a, nxt[a])
        out, a = [], 0
        while a != -1:
            s = sym[a]
            out += [self.id[s]] if s in self.id else [self.id[f"<0x{b:02X}>"] for b in s.encode()]
            a = nxt[a]
        return out


def fuzzed_texts(n, seed=0):
    rng = random.Random(seed)
    chars = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()[]{}-_=+*/\\\t\n") + [
        "é", "ü", "ß", "中", "文", "日本", "🙂", "Привет", "\u00a0", "ﬁ", "\u2581", "<", ">"]
    words = [" the", "The", " capital", "def ", " return", "import numpy", "  ", "    ", "\n\n", "<start_of_turn>",
             "<end_of_turn>", "<bos>", "hello", " world", "ing", "tion", "<0x41>", "[multimodal]"]
    return ["".join(rng.choice(chars if rng.random() < 0.6 else words) for _ in range(rng.randint(1, 40)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def gemma_vocab():
    import gguf
    r = gguf.GGUFReader(gemma_gguf())
    get = lambda k: r.fields[k].contents()           # noqa: E731
    return get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores"), get("tokenizer.ggml.token_type")


def test_the_rebuilt_vocabulary_tokenizes_as_sentencepiece_does(gemma_vocab):
    from tokenizers import Tokenizer
    tokens, scores, types = gemma_vocab
    tok = Tokenizer.from_str(build_spm_tokenizer_json(tokens, scores, types, add_space_prefix=False))
    ref = SentencePieceReference(tokens, scores, types)
    texts = fuzzed_texts(600) + ["The capital of France is", "  leading and trailing  ", "a\n\nb\n", "x" * 64,
                                 "<start_of_turn>user\nhi<end_of_turn>\n", "\u65e5\u672c\u8a9e\u306e\u6587"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text), text
        if "\u2581" not in text:              # (a written U+2581 decodes as the space it stands for)
            assert tok.decode(ids, skip_special_tokens=False) == text, text
    assert tok.encode("The capital of France is", add_special_tokens=False).ids == [818, 5279, 529, 7001, 563]


def test_a_space_prefix_vocabulary_is_refused_by_name(gemma_vocab):
    tokens, scores, types = gemma_vocab
    with pytest.raises(UnsupportedModelError, match="space prefix"):
        build_spm_tokenizer_json(tokens[:300], scores[:300], types[:300], add_space_prefix=True)


# ---------------------------------------------------------------- the real model

LONG = " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 13} apples." for i in range(70))
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "<start_of_turn>user\nWhat is 17 times 3?<end_of_turn>\n<start_of_turn>model\n", LONG]


@pytest.fixture(scope="module")
def gemma_bundle(tmp_path_factory):
    return convert(gemma_gguf(), tmp_path_factory.mktemp("gemma") / "b", dtype="f32", progress=False)


def test_gemma3_config_from_the_gguf(gemma_bundle):
    cfg = Engine(gemma_bundle).config
    assert cfg.arch == "gemma3" and cfg.activation == "gelu_tanh" and cfg.sliding_window == 512
    assert [i for i in range(cfg.n_layers) if i not in cfg.sliding_layers] == [5, 11, 17]
    assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6 and cfg.tie_embeddings
    assert 106 in cfg.eos_token_ids                    # <end_of_turn> ends a chat turn


# transformers' 64 greedy tokens on the same GGUF (fp32), recorded by the slow test's comparison:
# the default run checks the engine against them without loading transformers (~75 s)
TRANSFORMERS_GREEDY = {
    0: [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532, 506, 1855, 7488, 3207, 528, 3879, 236761, 1030, 563, 5628, 528, 506, 6029, 529, 506, 2891, 532, 563, 506, 5279, 529, 506, 4128, 529, 506, 1638, 1463, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532, 506, 1855, 7488, 3207, 528, 3879, 236761, 108, 818, 5279, 529, 7001],
    3: [17088, 236743, 236832, 236771, 236787, 506, 3730, 3673, 9258, 236743, 236819, 36157, 236761, 17088, 236743, 236832, 236770, 236787, 506, 3826, 3673, 9258, 236743, 236770, 236771, 36157, 236761, 17088, 236743, 236832, 236778, 236787, 506, 2604, 3673, 9258, 236743, 236770, 236770, 36157, 236761, 17088, 236743, 236832, 236800, 236787, 506, 3730, 3673, 9258, 236743, 236770, 236778, 36157, 236761, 17088, 236743, 236832, 236812, 236787, 506, 3826, 3673, 9258],
}


def test_gemma3_gives_transformers_greedy_tokens(gemma_bundle):
    """The short prompt and the 916-token one (past the 512-token window: the local layers' caches
    are rings) continue exactly as transformers did."""
    eng = Engine(gemma_bundle)
    for i, want in TRANSFORMERS_GREEDY.items():
        got = [s.token_id for s in eng.generate(PROMPTS[i], max_tokens=64, sampling=GREEDY, stop_at_eos=False)]
        assert got == want, PROMPTS[i][:40]


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma_bundle):
    """Greedy 64-token continuations identical, logits within 1e-3, for all four prompts."""
    compare(gemma_gguf(), gemma_bundle, prompts=PROMPTS)


def test_gemma3_chat_template(gemma_bundle):
    eng = Engine(gemma_bundle)
    ids = eng.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}])
    assert eng.tokenizer.decode(ids) == "user\nBe brief.\n\nHi\nmodel\n"     # turn markers are special
    assert ids[:2] == [2, 105] and ids[-1] == 107 and ids.count(105) == 2 and ids.count(106) == 1


# ---------------------------------------------------------------- sliding windows, tiny models

def _cfg(window=4, layers=(0,)):
    return ModelConfig(arch="gemma3", vocab_size=8, d_model=32, d_ff=4, n_layers=2, n_heads=1, n_kv_heads=(1, 1),
                       head_dim=8, max_position=256, norm_eps=1e-6, activation="gelu_tanh",
                       sliding_window=window, sliding_layers=layers, rope_local_theta=10.0)


def test_a_local_layer_keeps_a_ring_of_its_window():
    cfg = _cfg()
    cache = KVCache(cfg, 100, itemsize=4)
    n = 4 + RING_MARGIN
    assert cache.slots == [n, 100] and cache.ring(0) and not cache.ring(1)
    k = torch.arange(60, dtype=torch.float32).view(1, 60, 1).expand(1, 60, 8)
    cache.store(0, 0, k[:, :25], k[:, :25])
    cache.store(0, 25, k[:, 25:], k[:, 25:])
    K, _ = cache.keys(0, 60 - n, 60)
    assert K[0, :, 0].tolist() == list(range(60 - n, 60))           # in position order
    assert cache.can_rewind(60 - RING_MARGIN + 1, 60) and not cache.can_rewind(30, 60)
    grown = KVCache(cfg, 200, itemsize=4)
    grown.copy_from(cache, 60)
    assert grown.keys(0, 60 - n, 60)[0].equal(K)


def test_long_prompts_in_chunks_match_transformers(tiny_ckpt, tiny_bundle):
    """Prefill chunks longer than SMALL_T and the window: each chunk's local layers see the ring's
    older keys and their own (gemma3: local and global layers; mistral: every layer local)."""
    for arch in ("gemma3", "mistral"):
        ref = reference_model(tiny_ckpt(arch))
        ids = [(7 * i + 3) % 290 + 5 for i in range(70)]
        want = reference_logits(ref, ids)
        eng = Engine(tiny_bundle(arch, "f32"))
        cache = eng.new_cache(len(ids))
        assert cache.ring(0) and cache.slots[0] == SLIDING_WINDOW + RING_MARGIN
        got = torch.cat([eng.forward(torch.tensor(ids[a:b]), a, cache, last_only=False)
                         for a, b in ((0, 30), (30, 33), (33, 70))])
        assert (want - got).abs().max() < 1e-4 * want.abs().max(), arch


def test_a_rollback_past_the_ring_starts_over(tiny_bundle):
    eng = Engine(tiny_bundle("gemma3", "f32"))
    a = [(5 * i + 1) % 290 + 5 for i in range(40)]
    b = a[:5] + [9, 8, 7, 6]
    s = eng.session(64)
    s.prefill(a)
    s.rollback(5)                      # 35 tokens back: the local layers no longer hold them
    assert s.pos == 0
    got = s.prefill(b)
    assert (got - eng.logits(b)[-1]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", ["f16", "int8", "int4"])
def test_quantized_and_streamed_gemma3_follow_its_dram_run(tiny_bundle, dtype):
    path = tiny_bundle("gemma3", dtype)
    ids = [(3 * i + 2) % 290 + 5 for i in range(20)]
    want = [s.token_id for s in Engine(path).generate(ids, 24, GREEDY, stop_at_eos=False)]
    for opts in ({"offload": "window", "context": 64}, {"offload": "naive", "context": 64}):
        eng = Engine(path, **opts)
        assert [s.token_id for s in eng.generate(ids, 24, GREEDY, stop_at_eos=False)] == want, opts


@pytest.mark.parametrize("draft", ["lookup", "self"])
def test_a_draft_leaves_gemma3_greedy_unchanged(tiny_bundle, draft):
    eng = Engine(tiny_bundle("gemma3", "f32"), offload="window", context=96, draft=draft, draft_tokens="4")
    ids = [(3 * i + 2) % 290 + 5 for i in range(10)] * 3
    steps = list(eng.generate(ids, 40, GREEDY, stop_at_eos=False))
    plain = [s.token_id for s in eng.generate(ids, 40, GREEDY, stop_at_eos=False, speculate=False)]
    assert [s.token_id for s in steps] == plain
