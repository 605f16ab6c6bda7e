"""Gemma 3 (text): sandwich norms, query/key norms, GeGLU, a scaled embedding, local and global layers.

Each block is x += post_attn_norm(attn(attn_norm(x))); x += post_ffn_norm(ffn(ffn_norm(x))), all
RMSNorms whose weights are the applied factors (``storage.config``). Attention normalizes each
query and key head before the rotation; most layers attend to a sliding window of recent tokens
with their own rotary base (``ModelConfig.window``, ``KVCache`` rings), every sixth to the whole
context. The FFN's gate uses tanh-gelu (computed by the engine's FFN backend, as for SwiGLU).
"""
from __future__ import annotations

import torch

from storage.config import ModelConfig

from flashinfer_local.models.common import KVCache, attention, embed_rows, head_logits, rms_norm


class Gemma3Model:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], ffn):
        self.cfg, self.w, self.ffn = cfg, weights, ffn
        self.head = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]

    def embed(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return embed_rows(self.w["embed"], tokens) * self.cfg.embed_scale     # [T, d]

    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """tokens [T] at positions [pos, pos+T) -> logits [1 or T, vocab]."""
        cfg, w, eps = self.cfg, self.w, self.cfg.norm_eps
        x = self.embed(tokens, pos)
        for at, i in enumerate(cfg.stack):
            p = f"layers.{i}."
            a = attention(cfg, w, p, i, rms_norm(x, w[p + "attn_norm.weight"], eps), pos, cache, at)
            x = x + rms_norm(a, w[p + "post_attn_norm.weight"], eps)
            f = self.ffn(i, rms_norm(x, w[p + "ffn_norm.weight"], eps))
            x = x + rms_norm(f, w[p + "post_ffn_norm.weight"], eps)
        if last_only:
            x = x[-1:]
        return head_logits(rms_norm(x, w["final_norm.weight"], eps), self.head)
