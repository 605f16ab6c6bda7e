"""A long prompt's prefill: in chunks of PREFILL_TOKENS tokens, its attention in blocks of queries,
both giving the logits of one whole pass; and the plan's slack that bounds their temporaries."""
import pytest
import torch

import flashinfer_local.models.common as common
import flashinfer_local.runtime.engine as engine_mod
from flashinfer_local.runtime.budget import PREFILL_TOKENS, prefill_scratch_bytes
from flashinfer_local.runtime.engine import Engine
from storage.config import ModelConfig

IDS = [(7 * i + 3) % 250 for i in range(70)]


@pytest.mark.parametrize("arch,dtype,offload", [("llama", "f32", "none"), ("opt", "f32", "none"),
                                                ("llama", "int4", "none"), ("llama", "int4", "window")])
def test_chunked_prefill_gives_the_logits_of_one_pass(arch, dtype, offload, tiny_bundle, monkeypatch):
    eng = Engine(tiny_bundle(arch, dtype), offload=offload, context=128)
    def last():                    # the prompt's last logits, which generation uses
        return eng.forward(torch.tensor(IDS), 0, eng.new_cache(len(IDS)))[-1]
    whole, whole_last = eng.logits(IDS), last()
    monkeypatch.setattr(engine_mod, "PREFILL_TOKENS", 24)       # 70 tokens -> chunks of 23, 23, 24
    chunked = eng.logits(IDS)
    assert chunked.shape == whole.shape
    scale = whole.abs().max()
    assert (chunked - whole).abs().max() < 1e-4 * scale
    assert (last() - whole_last).abs().max() < 1e-4 * scale


@pytest.mark.parametrize("arch", ["llama", "deci"])
def test_attention_in_query_blocks_equals_one_block(arch, tiny_bundle, monkeypatch):
    eng = Engine(tiny_bundle(arch, "f32"))
    whole = eng.logits(IDS)
    H = eng.config.n_heads
    monkeypatch.setattr(common, "ATTN_BLOCK_BYTES", 4 * H * len(IDS) * 5)    # blocks of about 5 queries
    assert common.attention_block_tokens(H, len(IDS)) == 5
    blocked = eng.logits(IDS)
    assert (blocked - whole).abs().max() < 1e-4 * whole.abs().max()


def test_prefill_scratch_is_bounded_by_the_chunk_not_the_prompt():
    """Qwen2.5-Coder-1.5B's shape: the plan's prefill temporaries at 2048 and 32768 tokens of
    context stay near a hundred MiB (one chunk of PREFILL_TOKENS, the attention in blocks); the
    attention scores of a whole 2048-token prompt at once were 200 MB."""
    cfg = ModelConfig(arch="qwen2", n_layers=28, d_model=1536, d_ff=8960, n_heads=12, n_kv_heads=(2,) * 28,
                      head_dim=128, vocab_size=151936, max_position=32768, norm_eps=1e-6)
    short, long = prefill_scratch_bytes(cfg, 2048), prefill_scratch_bytes(cfg, 32768)
    assert short < 128 << 20 and long < short + 64 << 20
    assert prefill_scratch_bytes(cfg, 64) < short                  # a short context plans less
    assert PREFILL_TOKENS > 16                                     # each chunk is a prefill, not decode steps
