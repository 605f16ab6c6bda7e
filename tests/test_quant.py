"""int8/int4 group quantization: round trips, kernels against a numpy reference of the same
quantized weights, and every offload mode on quantized tiny bundles."""
import numpy as np
import pytest
import torch

from flashinfer_local.engine import Engine
from flashinfer_local.generate import SamplingParams
from flashinfer_local.kernels import RecordKernel
from storage import quant
from storage.config import ModelConfig
from storage.convert import build_records
from storage.format import field_values, record_layout
from storage.reader import Bundle

GREEDY = SamplingParams(temperature=0)
IDS = [5, 17, 42, 7, 99, 3, 150, 8]


def test_q8_round_trip_within_half_a_step():
    w = np.random.default_rng(0).standard_normal((20, 96)).astype(np.float32) * 3
    w[3] = 0                                                       # an all-zero vector stays zero
    q, s = quant.quantize_q8(w)
    back = quant.dequantize_q8(q, s)
    step = np.repeat(s.astype(np.float32), quant.GROUP, axis=1)    # [20, 96]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    assert np.all(back[3] == 0)
    # the largest value of each group is exact up to the f16 scale's rounding
    assert np.abs(np.abs(back).max() - np.abs(w).max()) < 1e-2


def test_q4_round_trip_and_packing():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((20, 64)).astype(np.float32)
    w[5] = 0.25                                                    # constant group: s = 0
    p, s, m = quant.quantize_q4(w, refits=0)                       # the plain min/max grid
    assert p.shape == (20, 32) and s.shape == m.shape == (20, 2)
    back = quant.dequantize_q4(p, s, m)
    step = np.repeat(s.astype(np.float32), quant.GROUP, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 + 2e-3)            # + the f16 minimum's rounding
    assert np.allclose(back[5], 0.25, atol=1e-3)
    # least-squares refits never make a group worse, and help on average
    p2, s2, m2 = quant.quantize_q4(w)
    e0 = ((back - w) ** 2).reshape(20, 2, 32).sum(2)
    e1 = ((quant.dequantize_q4(p2, s2, m2) - w) ** 2).reshape(20, 2, 32).sum(2)
    assert np.all(e1 <= e0 + 1e-6) and e1.sum() < 0.97 * e0.sum()
    # nibble order: value k of a group in the low nibble of byte k, value k + 16 in the high one
    codes = np.arange(32, dtype=np.float32) % 16
    p1, s1, m1 = quant.quantize_q4(codes[None, :], refits=0)
    assert p1[0, 0] == (0 | (0 << 4)) and p1[0, 1] == (1 | (1 << 4)) and s1[0, 0] == 1


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_record_kernel_matches_numpy_on_the_same_quantized_weights(gated, dtype):
    d, n = 96, 40
    cfg = ModelConfig(arch="llama" if gated else "opt", n_layers=1, d_model=d, d_ff=n, n_heads=1,
                      n_kv_heads=(1,), head_dim=96, vocab_size=2, max_position=8, norm_eps=1e-5,
                      activation="silu" if gated else "relu")
    rng = np.random.default_rng(2)
    t = {"gate": rng.standard_normal((n, d)), "up": rng.standard_normal((n, d)),
         "down": rng.standard_normal((d, n)), "up_bias": rng.standard_normal(n)}
    lay = record_layout(cfg, dtype)
    assert lay.record_bytes % 512 == 0
    rec = build_records(cfg, lay, {k: v.astype(np.float32) for k, v in t.items()})
    rows = np.array([0, 3, 7, 39, 20])
    x = rng.standard_normal(d).astype(np.float32)
    f = {k: field_values(rec[rows], lay, k).astype(np.float64) for k in ("gate", "up", "down")
         if gated or k != "gate"}
    if gated:
        g = f["gate"] @ x
        h = g / (1 + np.exp(-g)) * (f["up"] @ x)
    else:
        h = np.maximum(f["up"] @ x + field_values(rec[rows], lay, "up_bias")[:, 0], 0)
    want = h @ f["down"]
    out = np.zeros(d, np.float32)
    RecordKernel(lay, dtype, d)(rec, rows, x, out)
    np.testing.assert_allclose(out, want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_bundle_runs_in_every_mode(arch, dtype, tiny_bundle):
    path = tiny_bundle(arch, dtype)
    b = Bundle(path)
    assert b.ffn_dtype == dtype and b.dense_dtype == "f16"
    ref = Engine(path)                                         # all in DRAM: records + kernel
    want = [s.token_id for s in ref.generate(IDS, 16, GREEDY, stop_at_eos=False)]
    want_logits = ref.logits(IDS)
    scale = want_logits.abs().max()
    for mode in ("window", "naive"):
        eng = Engine(path, offload=mode, context=64)
        assert [s.token_id for s in eng.generate(IDS, 16, GREEDY, stop_at_eos=False)] == want, mode
        assert (eng.logits(IDS) - want_logits).abs().max() < 1e-4 * scale
    # (quality against the exact model is checked by perplexity on SmolLM2 below: the random tiny
    # models' logits are too small and peaky for a per-logit bound to mean much)
    # and smaller than f32 records
    assert b.layout.record_bytes < Bundle(tiny_bundle(arch, "f32")).layout.record_bytes


def test_smollm2_perplexity_int8_within_1pct_int4_within_5pct(smollm_bundle):
    """The issue's quality bar, on held-out standard-library text (prose and code, 1024 tokens
    each); measured at 1024 tokens each: int8 +0.3% (prose) / +0.6% (code), int4 +0.5% / +0.6%."""
    from flashinfer_local.evaluate import perplexity, stdlib_corpus
    corpus = stdlib_corpus()
    nll = {}
    for dtype in ("f16", "int8", "int4"):
        eng = Engine(smollm_bundle(dtype))
        nll[dtype] = sum(perplexity(eng, eng.tokenizer.encode(text), window=512, max_windows=2)["nll"]
                         for text in corpus.values()) / len(corpus)
    rel = {k: np.exp(v - nll["f16"]) - 1 for k, v in nll.items()}
    assert rel["int8"] < 0.01, rel
    assert rel["int4"] < 0.05, rel
