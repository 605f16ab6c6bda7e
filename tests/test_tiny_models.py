"""Each architecture, tiny and random, against transformers on the same checkpoint."""
import pytest

from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import SamplingParams
from tiny_models import reference_greedy, reference_logits, reference_model

from conftest import ARCHS

GREEDY = SamplingParams(temperature=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_transformers(arch, tiny_ckpt, tiny_bundle):
    ref = reference_model(tiny_ckpt(arch))
    eng = Engine(tiny_bundle(arch, "f32"))
    ids = [5, 17, 42, 7, 99, 3, 150, 8, 21, 64, 11, 2]
    want, got = reference_logits(ref, ids), eng.logits(ids)
    scale = want.abs().max()
    assert (want - got).abs().max() < 1e-4 * scale
    ours = [s.token_id for s in eng.generate(ids, max_tokens=32, sampling=GREEDY, stop_at_eos=False)]
    assert ours == reference_greedy(ref, ids, 32)


def test_kv_cache_sized_per_layer(tiny_bundle):
    eng = Engine(tiny_bundle("deci", "f32"))
    cache = eng.new_cache(10)
    assert [k.shape[0] for k in cache.k] == list(eng.config.n_kv_heads)
    assert cache.nbytes == 10 * eng.config.kv_bytes_per_token(4)        # an f32 bundle's cache is f32
    assert Engine(tiny_bundle("deci", "int8")).new_cache(10).nbytes == 10 * eng.config.kv_bytes_per_token(2)


def test_text_prompt_and_chat(tiny_bundle):
    eng = Engine(tiny_bundle("llama", "f32"))
    steps = list(eng.generate("hello world", max_tokens=5, sampling=GREEDY, stop_at_eos=False))
    assert len(steps) == 5 and steps[-1].stats.generated_tokens == 5
    ids = eng.encode_prompt("hi", chat=True)
    assert eng.tokenizer.decode(ids)        # template rendered and tokenized


def test_sampling_is_seeded(tiny_bundle):
    eng = Engine(tiny_bundle("qwen2", "f32"))
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = [s.token_id for s in eng.generate([1, 2, 3], max_tokens=12, sampling=p, stop_at_eos=False)]
    b = [s.token_id for s in eng.generate([1, 2, 3], max_tokens=12, sampling=p, stop_at_eos=False)]
    assert a == b


def test_context_limit_is_a_clear_error(tiny_bundle):
    from storage.errors import FlashinferError
    eng = Engine(tiny_bundle("llama", "f32"))
    with pytest.raises(FlashinferError, match="context"):
        list(eng.generate([1, 2, 3], max_tokens=10_000))
