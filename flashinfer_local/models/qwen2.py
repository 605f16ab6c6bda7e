"""Qwen2 family (Qwen1.5, Qwen2, Qwen2.5, Qwen2.5-Coder).

Same block as Llama; the differences live in the weights: biases on q/k/v (picked up by
``attention`` when present) and usually an untied head. Kept as its own file so Qwen-specific
fix-ups have a home.
"""
from __future__ import annotations

from .llama import LlamaModel


class Qwen2Model(LlamaModel):
    pass
