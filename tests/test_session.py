"""The generation session: a KV cache kept across calls, rollback, prefix reuse, sampling with
probabilities, incremental detokenization, stop strings and finish reasons."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashinfer_local.runtime.session as session_mod
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import Sampler, SamplingParams
from flashinfer_local.runtime.session import StopStrings
from flashinfer_local.runtime.tokenizer import IncrementalDecoder, Tokenizer
from storage.errors import FlashinferError
from storage.reader import Bundle

GREEDY = SamplingParams(temperature=0)
IDS = [5, 17, 42, 7, 99, 3, 150, 8, 21, 64]


@pytest.mark.parametrize("arch,offload", [("llama", "none"), ("opt", "none"), ("llama", "window"),
                                          ("qwen2", "naive")])
def test_append_and_rollback_give_the_fresh_forward(tiny_bundle, arch, offload):
    path = tiny_bundle(arch, "f32")
    eng = Engine(path, offload=offload, context=64)
    want = eng.logits(IDS)
    scale = want.abs().max()
    s = eng.session()
    got = torch.cat([s.append(IDS[:4]), s.append(IDS[4:5]), s.append(IDS[5:])])   # prefill, decode, verify
    assert s.pos == len(IDS)
    assert (got - want).abs().max() < 1e-4 * scale
    s.rollback(3)                                    # forget, then take another continuation
    other = [11, 12, 13]
    alt = s.append(other)
    assert s.tokens == IDS[:3] + other
    assert (alt - eng.logits(IDS[:3] + other)[3:]).abs().max() < 1e-4 * scale
    with pytest.raises(FlashinferError, match="rollback"):
        s.rollback(7)
    eng.close()


def test_the_cache_grows_and_keeps_what_it_holds(tiny_bundle, monkeypatch):
    monkeypatch.setattr(session_mod, "FIRST_CAPACITY", 2)
    eng = Engine(tiny_bundle("llama", "f32"))
    s = eng.session()
    assert s.cache.capacity == 2
    got = torch.cat([s.append([t]) for t in IDS])
    assert s.cache.capacity >= len(IDS)
    want = eng.logits(IDS)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_a_prompt_extending_the_session_computes_only_the_new_tokens(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"))
    s = eng.session()
    seen = []
    first = [st.token_id for st in s.generate(IDS[:6], 4, GREEDY, stop_at_eos=False)]
    held = list(s.tokens)
    assert held[:6] == IDS[:6] and len(held) == 6 + 3      # the last sampled token is not yet run
    with eng.observe(lambda layer, x, mask: seen.append(x.shape[0]) if layer == 0 else None):
        again = [st.token_id for st in s.generate(held + [first[-1]] + [9, 10], 3, GREEDY, stop_at_eos=False)]
    assert seen[0] == 3                                     # only the three new prompt tokens
    fresh = [st.token_id for st in eng.generate(held + [first[-1]] + [9, 10], 3, GREEDY, stop_at_eos=False)]
    assert again == fresh
    assert first == [st.token_id for st in eng.generate(IDS[:6], 4, GREEDY, stop_at_eos=False)]


def test_sampling_returns_the_token_and_its_probabilities():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0, 0.5])
    g = Sampler(GREEDY)(logits)
    assert g.token == 1 and torch.equal(g.probs, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    assert g.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, seed=3))(logits)
    assert s.token in (1, 2)
    assert s.probs.sum() == pytest.approx(1.0) and s.probs[[0, 3, 4]].sum() == 0
    assert s.probs[1] / s.probs[2] == pytest.approx(float(torch.exp(torch.tensor(1.0))))


def test_steps_carry_probabilities_and_finish_reasons(tiny_bundle):
    eng = Engine(tiny_bundle("qwen2", "f32"))
    steps = list(eng.generate(IDS, 5, GREEDY, stop_at_eos=False, logprobs=True))
    assert [x.finish_reason for x in steps] == [None] * 4 + ["length"]
    assert steps[-1].stats.finish_reason == "length"
    assert all(x.sample.probs[x.token_id] == 1 for x in steps)
    # without logprobs a step holds no vocabulary-sized tensor (a caller may keep every step)
    assert all(x.sample is None for x in eng.generate(IDS, 3, GREEDY, stop_at_eos=False))
    # treat the second greedy token as end-of-sequence: the generation ends before it
    eos_tok = steps[1].token_id
    eng.tokenizer.eos_token_ids = frozenset({eos_tok})
    cut = list(eng.generate(IDS, 5, GREEDY))
    assert cut[-1].stats.token_ids == [steps[0].token_id] and cut[0].token_id == steps[0].token_id
    # text held back at that point (half a character here) comes in a last step carrying the token
    assert [x.token_id for x in cut[1:]] in ([], [eos_tok])
    assert cut[-1].stats.finish_reason == "eos" and cut[-1].finish_reason in (None, "eos")
    assert "".join(x.text for x in cut) == eng.tokenizer.decode([steps[0].token_id])
    assert list(eng.generate(IDS, 0, GREEDY)) == []
    with pytest.raises(FlashinferError, match="prompt is empty"):
        list(eng.generate([], 3, GREEDY))


def test_stop_strings_end_the_text_before_them(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"))
    full = "".join(x.text for x in eng.generate("hello world", 24, GREEDY, stop_at_eos=False))
    assert len(full) > 6
    stop = full[3:6]                                        # a string the greedy text is known to hold
    steps = list(eng.generate("hello world", 24, GREEDY, stop_at_eos=False, stop=[stop, "never-there"]))
    assert "".join(x.text for x in steps) == full[:full.index(stop)]
    assert steps[-1].finish_reason == "stop" == steps[-1].stats.finish_reason


def test_stop_string_matcher_holds_back_a_possible_start():
    m = StopStrings(["END", "stop"])
    assert m.feed("abcE") == ("abc", False)               # "E" may start "END"
    assert m.feed("x") == ("Ex", False)
    assert m.feed("s") == ("", False)
    assert m.feed("toEN") == ("sto", False)                # "sto" is no start of "stop"; "EN" may be "END"
    m = StopStrings(["END"])
    assert m.feed("xxEN") == ("xx", False)
    assert m.feed("Dyy") == ("", True)                     # "END" reached: nothing after it
    m = StopStrings([])
    assert m.feed("END") == ("END", False)


def test_chat_messages_are_templated(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    ids = eng.encode_prompt(msgs)
    assert ids == eng.tokenizer.apply_chat_template(msgs)
    text = eng.tokenizer.decode(ids)
    assert "be brief" in text and "again" in text
    assert eng.encode_prompt("hi", chat=True) == eng.encode_prompt([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_bundle):
    return Tokenizer(Bundle(smollm_bundle("f16")))


def _pieces(tok, ids):
    d = IncrementalDecoder(tok)
    out = [d.add(t) for t in ids]
    return out, d.flush()


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=40))
def test_incremental_detokenization_equals_full_decoding(smollm_tokenizer, ids):
    pieces, rest = _pieces(smollm_tokenizer, ids)
    assert "".join(pieces) + rest == smollm_tokenizer.decode(ids)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=511), max_size=40))
def test_incremental_detokenization_on_the_tiny_tokenizer(tiny_bundle, ids):
    tok = Tokenizer(Bundle(tiny_bundle("llama", "f32")))
    pieces, rest = _pieces(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids)


def test_multibyte_characters_come_out_whole(smollm_tokenizer):
    text = "naïve café, 日本語のテキスト and 🙂🚀 emoji"
    ids = smollm_tokenizer.encode(text, special=False)
    pieces, rest = _pieces(smollm_tokenizer, ids)
    assert "".join(pieces) == text and rest == ""
    assert not any("\ufffd" in p for p in pieces)
