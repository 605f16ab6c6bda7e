"""The function a gated FFN applies to its gate values, by the model's ``activation``: silu
(SwiGLU: Llama, Qwen2) or tanh-gelu (GeGLU: Gemma 3). Shared by calibration, the predictors, the
selectors and every FFN backend, so a gate score is always the model's own activation."""
from __future__ import annotations

import torch.nn.functional as F

from storage.config import ModelConfig


def _gelu_tanh(g):
    return F.gelu(g, approximate="tanh")


def act_fn(activation: str):
    """act(g) of a gated FFN with ``activation`` "silu" or "gelu_tanh" (tensors of any shape)."""
    return _gelu_tanh if activation == "gelu_tanh" else F.silu


def gate_activation(cfg: ModelConfig):
    """act(g) for a gated model's gate values g."""
    return act_fn(cfg.activation)
