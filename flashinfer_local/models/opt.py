"""OPT (Meta's Open Pre-trained Transformers): the model the "LLM in a Flash" paper used.

LayerNorm pre-norm blocks, learned absolute positions (table offset 2), biases everywhere, a ReLU
MLP (fc1 = "up", fc2 = "down"); fc2's bias is per output, so it lives in the dense part.
"""
from __future__ import annotations

import torch

from storage.config import ModelConfig

from flashinfer_local.models.common import KVCache, attention, embed_rows, head_logits, layer_norm


class OPTModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], ffn):
        self.cfg, self.w, self.ffn = cfg, weights, ffn
        self.head = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]

    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """tokens [T] at positions [pos, pos+T) -> logits [1 or T, vocab]."""
        cfg, w, eps = self.cfg, self.w, self.cfg.norm_eps
        T, off = tokens.shape[0], cfg.position_offset
        x = embed_rows(w["embed"], tokens) + w["pos_embed"][pos + off:pos + off + T].float()
        for at, i in enumerate(cfg.stack):
            p = f"layers.{i}."
            h = layer_norm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"], eps)
            x = x + attention(cfg, w, p, i, h, pos, cache, at)
            h = layer_norm(x, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"], eps)
            x = x + self.ffn(i, h) + w[p + "down_bias"]
        if last_only:
            x = x[-1:]
        return head_logits(layer_norm(x, w["final_norm.weight"], w["final_norm.bias"], eps), self.head)
