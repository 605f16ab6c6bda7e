"""Llama family: Llama 1/2/3, Mistral-style, SmolLM, DeciLM (per-layer key/value heads).

Pre-norm blocks: x += attn(rms_norm(x)); x += ffn(rms_norm(x)). RoPE positions, SwiGLU FFN
(computed by the engine's FFN backend, which owns the neuron records).
"""
from __future__ import annotations

import torch

from storage.config import ModelConfig

from flashinfer_local.models.common import KVCache, attention, embed_rows, head_logits, rms_norm


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], ffn):
        self.cfg, self.w, self.ffn = cfg, weights, ffn
        self.head = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]

    def embed(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return embed_rows(self.w["embed"], tokens)     # [T, d]

    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """tokens [T] at positions [pos, pos+T) -> logits [1 or T, vocab]."""
        cfg, w = self.cfg, self.w
        x = self.embed(tokens, pos)
        for at, i in enumerate(cfg.stack):
            p = f"layers.{i}."
            x = x + attention(cfg, w, p, i, rms_norm(x, w[p + "attn_norm.weight"], cfg.norm_eps), pos, cache, at)
            x = x + self.ffn(i, rms_norm(x, w[p + "ffn_norm.weight"], cfg.norm_eps))
        if last_only:
            x = x[-1:]
        return head_logits(rms_norm(x, w["final_norm.weight"], cfg.norm_eps), self.head)
