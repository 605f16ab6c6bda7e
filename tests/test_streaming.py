"""Streaming FFN records from the SSD: window and naive modes against the all-in-DRAM path."""
import numpy as np
import pytest
import torch

from flashinfer_local.runtime.budget import minimum_budget
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import SamplingParams
from storage.errors import FlashinferError
from storage.reader import Bundle

GREEDY = SamplingParams(temperature=0)
IDS = [5, 17, 42, 7, 99, 3, 150, 8]
CTX = 64


def budgets(path):
    """No cache, a cache of about a third of each layer, and an unlimited one."""
    b = Bundle(path)
    base = minimum_budget(b, CTX)
    third = (b.config.d_ff // 3) * b.config.n_layers * (b.layout.record_bytes + 24)
    return [("window", base), ("window", base + third), ("window", None), ("naive", None)]


def decode_logits(eng, ids):
    cache = eng.new_cache(len(ids))
    return torch.cat([eng.forward(torch.tensor([t]), i, cache) for i, t in enumerate(ids)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "deci", "gemma3"])
def test_offload_modes_match_dense(arch, tiny_bundle):
    path = tiny_bundle(arch, "f32")
    ref = Engine(path)
    want_tokens = [s.token_id for s in ref.generate(IDS, 24, GREEDY, stop_at_eos=False)]
    want_prefill, want_decode = ref.logits(IDS), decode_logits(ref, IDS)
    scale = want_prefill.abs().max()
    for mode, budget in budgets(path):
        eng = Engine(path, offload=mode, dram_budget=budget, context=CTX)
        got = [s.token_id for s in eng.generate(IDS, 24, GREEDY, stop_at_eos=False)]
        assert got == want_tokens, (mode, budget)
        assert (eng.logits(IDS) - want_prefill).abs().max() < 1e-4 * scale          # prefill path
        assert (decode_logits(eng, IDS) - want_decode).abs().max() < 1e-4 * scale   # kernel path


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3"])
def test_f16_streaming_close_to_dense(arch, tiny_bundle):
    path = tiny_bundle(arch, "f16")
    a, b = decode_logits(Engine(path), IDS), decode_logits(Engine(path, offload="window", context=CTX), IDS)
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


def test_partial_cache_reads_and_hits(tiny_bundle):
    path = tiny_bundle("llama", "f32")
    eng = Engine(path, offload="window", dram_budget=budgets(path)[1][1], context=CTX)
    steps = list(eng.generate(IDS, 12, GREEDY, stop_at_eos=False))
    x = steps[-1].stats.extra
    assert 0 < x["cache_rows_per_layer"] < eng.config.d_ff
    assert x["flash_bytes_per_token"] > 0 and 0 < x["cache_hit_rate"] < 1
    assert set(x["ms_per_token"]) == {"io_wait", "bookkeeping", "compute", "selection"}


def test_oracle_selects_the_requested_share(tiny_bundle):
    path = tiny_bundle("llama", "f32")
    eng = Engine(path, offload="window", selector="oracle", sparsity=0.75, context=CTX)
    x = torch.randn(1, eng.config.d_model)
    ids = eng.selector.select(0, x)
    assert len(ids) == round(eng.config.d_ff * 0.25)
    # the kept neurons are the largest |activation| ones
    dense = Engine(path).ffn
    act = (torch.nn.functional.silu(x @ dense.gate[0].T) * (x @ dense.up[0].T)).abs()[0]
    assert act[ids].min() >= act[np.setdiff1d(np.arange(len(act)), ids)].max()
    # with sparsity 0 the oracle is the exact model
    eng0 = Engine(path, offload="window", selector="oracle", sparsity=0.0, context=CTX)
    ref = [s.token_id for s in Engine(path).generate(IDS, 16, GREEDY, stop_at_eos=False)]
    assert [s.token_id for s in eng0.generate(IDS, 16, GREEDY, stop_at_eos=False)] == ref


def test_too_small_budget_names_the_minimum(tiny_bundle):
    path = tiny_bundle("llama", "f32")
    need = minimum_budget(Bundle(path), CTX)
    with pytest.raises(FlashinferError, match="needs at least"):
        Engine(path, offload="window", dram_budget=need - 1, context=CTX)
    with pytest.raises(FlashinferError, match="--offload window"):
        Engine(path, offload="none", dram_budget=1 << 20)


def test_smollm2_streamed_below_its_size(smollm_bundle):
    """The real model, window mode at a budget below the bundle: same tokens as all-in-DRAM, and
    peak RSS above the runtime baseline stays within the budget."""
    path = smollm_bundle("f32")
    ids = Engine(path).tokenizer.encode("The history of the Roman empire")
    want = [s.token_id for s in Engine(path).generate(ids, 24, GREEDY, stop_at_eos=False)]
    size = Bundle(path).sizes()["total_bytes"]
    budget = int(size * 0.75)
    eng = Engine(path, offload="window", dram_budget=budget, context=256)
    steps = list(eng.generate(ids, 24, GREEDY, stop_at_eos=False))
    assert [s.token_id for s in steps] == want
    st = steps[-1].stats
    assert st.peak_rss_bytes - eng.runtime_baseline_bytes <= budget
    assert st.extra["flash_bytes_per_token"] > 0


def test_budget_counts_the_buffers_the_backend_allocates(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"), offload="window", context=CTX)
    assert eng.resident()["buffer_bytes"] <= eng.plan.buffer_bytes


def test_a_multi_token_pass_computes_each_tokens_own_selection(tiny_bundle):
    """Several tokens in one pass (a prefill, or verifying drafted tokens) read the union of their
    neurons once, but each token computes only its own selection: streamed or in DRAM, the logits
    equal those of feeding the tokens one at a time."""
    path = tiny_bundle("llama", "f32")
    ref = Engine(path, selector="oracle", sparsity=0.5)
    one_by_one = decode_logits(ref, IDS)
    scale = one_by_one.abs().max()
    for mode in ("none", "window", "naive"):
        eng = Engine(path, offload=mode, selector="oracle", sparsity=0.5, context=CTX)
        assert (eng.logits(IDS) - one_by_one).abs().max() < 1e-4 * scale, mode
        eng.close()


def test_prompt_pins_hold_the_prompts_neurons_and_change_nothing(tiny_bundle):
    """--prompt-pin: after a prefill, each window holds the prompt's most active neurons pinned;
    the logits are the same as without (it only decides what DRAM holds)."""
    path = tiny_bundle("llama", "f16")
    b = Bundle(path)
    budget = minimum_budget(b, CTX) + (150 << 10)
    b.close()
    ids = list(range(3, 40))
    out, hits = {}, {}
    for share in (0.0, 0.5):
        eng = Engine(path, offload="window", dram_budget=budget, context=CTX, prompt_pin=share)
        s = eng.session(CTX)
        got = [s.append(ids)]
        for t in (4, 11, 2, 19, 7):
            got.append(s.append([t]))
        out[share], hits[share] = torch.cat(got), eng.counters().hits
        for w in eng.ffn.windows:
            w.check()
            assert w.n_pinned == (w.capacity // 2 if share else 0)
        eng.close()
    assert torch.equal(out[0.5], out[0.0]) and hits[0.5] > hits[0.0]
    with pytest.raises(FlashinferError, match="prompt_pin 2.0 must be a share from 0 to 1") as e:
        Engine(path, prompt_pin=2.0)
    assert e.value.cli_message.startswith("--prompt-pin 2.0")
