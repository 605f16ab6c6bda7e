"""Speculative decoding: a forward of several tokens computes each exactly as one token would
(the property lossless verification rests on), greedy output with every draft kind equals the
output without one, rejection sampling keeps the target's distribution, rollback, the draft's
tokenizer check and its place in the budget."""
import numpy as np
import pytest
import torch

from storage.errors import FlashinferError

from flashinfer_local.runtime.budget import draft_model_bytes, kv_cache_bytes, minimum_budget, plan_budget
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import Sampler, SamplingParams
from flashinfer_local.runtime.speculative import LookupDraft, Proposal, check_same_tokenizer, verify

GREEDY = SamplingParams(temperature=0)
PROMPT = [5, 17, 42, 7, 99, 3, 150, 8, 5, 17, 42, 7]
MODES = [dict(offload="none"), dict(offload="window", context=64), dict(offload="naive", context=64),
         dict(offload="window", context=64, selector="oracle", sparsity=0.5)]


def _one_by_one_and_together(eng, prompt, cont):
    """Logits of ``cont`` run one token at a time and in one forward, after the same prompt."""
    a, b = eng.session(), eng.session()
    a.prefill(prompt)
    b.prefill(prompt)
    one = torch.stack([a.append([t])[-1].clone() for t in cont])
    return one, b.append(cont)


@pytest.mark.parametrize("dtype", ["f32", "f16", "int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("mode", range(len(MODES)))
def test_several_tokens_compute_exactly_what_one_token_does(tiny_bundle, arch, dtype, mode):
    """Bit for bit: the window's state, the union read of a streamed layer, the int8 copy of x and
    the summation order do not depend on how many tokens share the forward."""
    eng = Engine(tiny_bundle(arch, dtype), **MODES[mode])
    one, together = _one_by_one_and_together(eng, PROMPT, [11, 3, 250, 77, 8, 9, 40])
    assert torch.equal(one, together)


def test_smollm_several_tokens_are_exact(smollm_bundle):
    """The real model, streamed under a budget, int4 records and int8 dense matrices."""
    eng = Engine(smollm_bundle("int4"), offload="window", dram_budget=300 << 20, context=256)
    ids = eng.tokenizer.encode("def add(a, b):\n    return")
    one, together = _one_by_one_and_together(eng, ids, eng.tokenizer.encode(" a + b\n\nprint(add(1,")[:8])
    assert torch.equal(one, together)


def test_rollback_leaves_the_cache_as_a_fresh_forward(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "int4"), offload="window", context=64)
    s = eng.session()
    s.prefill(PROMPT)
    s.append([1, 2, 3, 4])
    s.rollback(len(PROMPT) + 1)
    got = s.append([9, 10])
    fresh = eng.session()
    fresh.prefill(PROMPT + [1])
    assert torch.equal(got, fresh.append([9, 10]))


def _tokens(eng, prompt, n=24, speculate=True, sampling=GREEDY):
    return [s.token_id for s in eng.generate(prompt, n, sampling, stop_at_eos=False, speculate=speculate)]


@pytest.mark.parametrize("draft", ["lookup", "self", "model"])
@pytest.mark.parametrize("mode", range(len(MODES)))
@pytest.mark.parametrize("dtype", ["f32", "int4"])
def test_greedy_with_a_draft_is_greedy_without(tiny_bundle, draft, mode, dtype):
    opts = MODES[mode]
    if draft == "self" and opts["offload"] != "window":
        pytest.skip("the self draft needs a window")
    d = str(tiny_bundle("qwen2", "int8")) if draft == "model" else draft    # same tokenizer, another model
    eng = Engine(tiny_bundle("llama", dtype), draft=d, draft_tokens="auto", **opts)
    want = _tokens(eng, PROMPT, speculate=False)
    steps = list(eng.generate(PROMPT, 24, GREEDY, stop_at_eos=False))
    assert [s.token_id for s in steps] == want
    st = steps[-1].stats
    assert st.draft and st.generated_tokens == 24 and st.decode_tokens == 23
    assert st.decode_steps <= st.decode_tokens and st.accepted_tokens <= st.drafted_tokens
    if draft == "model":          # a real draft proposes every step; lookup only on a match
        assert st.drafted_tokens > 0


def test_a_self_draft_with_the_whole_model_resident_is_always_accepted(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"), offload="window", dram_budget=1 << 30, context=64,
                 draft="self", draft_tokens="3")
    steps = list(eng.generate(PROMPT, 17, GREEDY, stop_at_eos=False))
    st = steps[-1].stats
    assert [s.token_id for s in steps] == _tokens(eng, PROMPT, 17, speculate=False)
    assert st.accepted_tokens == st.drafted_tokens > 0 and st.tokens_per_forward == 4


@pytest.mark.parametrize("draft", ["lookup", "self"])
def test_smollm_greedy_is_unchanged_by_a_draft(smollm_bundle, draft):
    eng = Engine(smollm_bundle("int4"), offload="window", dram_budget=300 << 20, context=256, draft=draft)
    prompt = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef fact(n):\n"
    steps = list(eng.generate(prompt, 40, GREEDY, stop_at_eos=False))
    assert [s.token_id for s in steps] == _tokens(eng, prompt, 40, speculate=False)
    if draft == "lookup":
        assert steps[-1].stats.accepted_tokens > 0          # code repeats itself: lookup finds matches


def test_lookup_continues_the_latest_match():
    d = LookupDraft()
    s = Sampler(GREEDY)
    assert d.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, s).tokens == [7, 8]   # the latest 3-gram
    assert d.propose([4, 5, 6, 5], 3, s).tokens == [6, 5]                            # 1-gram fallback
    assert d.propose([1, 2, 3], 4, s).tokens == []


def _tv(counts, p):
    return 0.5 * np.abs(counts / counts.sum() - p).sum()


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(deterministic):
    """The first token a verification emits, over many trials, is distributed as the target's p,
    whatever the draft's q: total variation below 4 sqrt(V / N) (about 4 standard deviations of
    the TV of N samples from p itself)."""
    V, N = 8, 20000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, V, generator=g) * 1.5                    # logits after pending, after d1
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=1))
    p = torch.softmax(target[0], -1).numpy()
    q = torch.softmax(torch.randn(V, generator=g) * 2, -1)          # a draft that disagrees with p
    counts = np.zeros(V)
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g)) if not deterministic else 3
        kept, nxt = verify(target, Proposal([d], None if deterministic else [q]), sampler)
        counts[d if kept else nxt.token] += 1
    assert _tv(counts, p) < 4 * np.sqrt(V / N)


def test_a_draft_equal_to_the_target_is_always_kept_and_the_bonus_token_comes_from_p_k():
    V, N = 8, 20000
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, V, generator=g)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=3))
    p0, p1 = torch.softmax(target[0], -1), torch.softmax(target[1], -1).numpy()
    counts = np.zeros(V)
    for _ in range(N):
        d = int(torch.multinomial(p0, 1, generator=g))
        kept, nxt = verify(target, Proposal([d], [p0]), sampler)
        assert kept == 1
        counts[nxt.token] += 1
    assert _tv(counts, p1) < 4 * np.sqrt(V / N)


def test_sampled_generation_with_a_draft_runs_to_length(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"), draft=str(tiny_bundle("qwen2", "int8")))
    steps = list(eng.generate(PROMPT, 20, SamplingParams(temperature=0.8, seed=0), stop_at_eos=False))
    assert len(steps) == 20 and steps[-1].finish_reason == "length"
    assert steps[-1].stats.drafted_tokens > 0


def test_a_draft_with_another_tokenizer_is_refused(tiny_bundle, smollm_bundle):
    with pytest.raises(FlashinferError, match="does not share the target's tokenizer: vocabulary sizes"):
        Engine(tiny_bundle("llama", "f32"), draft=str(smollm_bundle("int4")))

    class Tok:
        available, eos_token_ids, bos_token_id = True, frozenset([0]), None

        def __init__(self, vocab):
            self.vocabulary = lambda: vocab

    cfg = type("C", (), {"vocab_size": 2})
    with pytest.raises(FlashinferError, match="vocabularies differ"):
        check_same_tokenizer(cfg, Tok({"a": 0, "b": 1}), cfg, Tok({"a": 1, "b": 0}), "d")
    check_same_tokenizer(cfg, Tok({"a": 0, "b": 1}), cfg, Tok({"a": 0, "b": 1}), "d")


def test_bad_drafts_get_clear_errors(tiny_bundle, tmp_path):
    path = tiny_bundle("llama", "f32")
    with pytest.raises(FlashinferError, match="self draft computes with the FFN neurons the window holds") as e:
        Engine(path, draft="self")
    assert "--offload none; use --offload window" in e.value.cli_message
    with pytest.raises(FlashinferError, match="is not lookup, self or a bundle"):
        Engine(path, draft=str(tmp_path))
    with pytest.raises(FlashinferError, match="draft_tokens 0 must be auto or a whole number from 1 to 15") as e:
        Engine(path, draft="lookup", draft_tokens="0")
    assert e.value.cli_message.startswith("--draft-tokens 0")


def test_the_budget_counts_the_draft(tiny_bundle):
    target, draft = tiny_bundle("llama", "f32"), tiny_bundle("qwen2", "int8")
    plain = Engine(target, offload="window", dram_budget=200 << 20, context=64)
    eng = Engine(target, offload="window", dram_budget=200 << 20, context=64, draft=str(draft))
    want = draft_model_bytes(eng.draft_engine.bundle, 64)
    assert eng.plan.draft_bytes == want > 0
    assert eng.plan.owners()["draft"] == want
    assert eng.plan.total_bytes <= 200 << 20 and eng.memory_facts()["draft_bytes"] == want
    assert eng.plan.cache_bytes <= plain.plan.cache_bytes
    selfd = Engine(target, offload="window", dram_budget=200 << 20, context=64, draft="self")
    assert selfd.plan.draft_bytes == kv_cache_bytes(selfd.config, 64, itemsize=4)      # an f32 bundle's cache
    least = minimum_budget(eng.bundle, 64, "window", draft=want)
    assert least == minimum_budget(eng.bundle, 64, "window") + want
    with pytest.raises(FlashinferError, match=r"draft \d"):
        plan_budget(eng.bundle, least - 1, 64, "window", draft=want)


def test_a_masked_prefill_does_not_depend_on_what_the_window_holds(smollm_bundle):
    """A prefill (more than SMALL_T tokens) computes its chunks in id order whatever the window
    holds, so a prompt gives the same logits before and after other tokens changed the window, and
    at another budget (with per-token masks, a different summation order moved neurons across the
    cutoff: the same prompt gave logits up to 0.2 apart on Qwen-1.5B with the threshold predictor)."""
    path = smollm_bundle("f16")
    got = []
    for budget in (300 << 20, 320 << 20):
        eng = Engine(path, offload="window", context=128, dram_budget=budget, selector="oracle", sparsity=0.5)
        assert eng.plan.cache_rows_per_layer < eng.config.d_ff
        prompt = eng.tokenizer.encode("The lighthouse keepers climbed the stairs every evening to light the "
                                      "lamps, and they stayed awake through the storms of the winter nights.")
        for _ in range(2):
            s = eng.session()
            got.append(s.prefill(prompt).clone())
            s.append(prompt[:5])
            s.append([7])
    assert all(torch.equal(g, got[0]) for g in got)
