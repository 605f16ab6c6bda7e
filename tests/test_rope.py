"""Rotary frequencies with context scaling, against transformers' own initialisation."""
import pytest
import torch

from flashinfer_local.models.common import rope_inv_freq
from storage.config import ModelConfig

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def cfg(scaling):
    return ModelConfig(arch="llama", vocab_size=10, d_model=256, d_ff=8, n_layers=1, n_heads=2,
                       n_kv_heads=(2,), head_dim=128, max_position=131072, norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=scaling)


def test_llama3_scaling_matches_transformers():
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = tr.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072,
                        rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg(LLAMA3)), want.float(), rtol=1e-6, atol=0)


def test_gguf_freq_factors_reproduce_llama3():
    # llama.cpp stores llama3 scaling as divisors of the unscaled frequencies (rope_freqs.weight)
    base, scaled = rope_inv_freq(cfg(None)), rope_inv_freq(cfg(LLAMA3))
    factors = (base.double() / scaled.double()).tolist()
    got = rope_inv_freq(cfg({"rope_type": "freq_factors", "factors": factors}))
    torch.testing.assert_close(got, scaled, rtol=1e-6, atol=0)
