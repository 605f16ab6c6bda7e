"""Model families, chosen by the bundle's normalized architecture name."""
from __future__ import annotations

from storage.config import ModelConfig
from storage.errors import UnsupportedModelError

from .gemma3 import Gemma3Model
from .llama import LlamaModel
from .opt import OPTModel
from .qwen2 import Qwen2Model

FAMILIES = {"llama": LlamaModel, "qwen2": Qwen2Model, "opt": OPTModel, "gemma3": Gemma3Model}


def build_model(cfg: ModelConfig, weights: dict, ffn):
    try:
        cls = FAMILIES[cfg.arch]
    except KeyError:
        raise UnsupportedModelError(f"no model code for architecture '{cfg.arch}'") from None
    return cls(cfg, weights, ffn)
