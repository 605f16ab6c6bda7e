"""The normalized model configuration shared by every architecture.

Sources (HF ``config.json`` or GGUF metadata) are parsed into one frozen :class:`ModelConfig`; the
bundle manifest stores it as JSON and the engine builds its model from it. Architecture families:

- ``llama``: Llama 1/2/3, Mistral-style, SmolLM, DeciLM (per-layer KV heads). RMSNorm, RoPE, SwiGLU.
- ``qwen2``: as llama plus biases on q/k/v and (usually) an untied head.
- ``opt``: LayerNorm, learned positions (offset 2), ReLU MLP with biases everywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import CheckpointError, UnsupportedModelError

ARCHS = ("llama", "qwen2", "opt")
LIMITS = {"vocab_size": 1 << 22, "max_position": 1 << 22, "n_layers": 4096, "n_heads": 4096, "head_dim": 4096}


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # one of ARCHS
    vocab_size: int
    d_model: int
    d_ff: int                      # FFN neurons per layer
    n_layers: int
    n_heads: int
    n_kv_heads: tuple[int, ...]    # per layer (variable GQA); len == n_layers
    head_dim: int
    max_position: int              # longest context the model was trained for
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # None or {"rope_type": "linear"|"llama3"|"freq_factors", ...}
    tie_embeddings: bool = False
    activation: str = "silu"       # silu (gated), relu (OPT)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UnsupportedModelError(
                f"architecture '{str(self.arch)[:40]}' is not supported (supported: {', '.join(ARCHS)})")
        for name in ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "head_dim", "max_position"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= LIMITS.get(name, 1 << 24):
                raise CheckpointError(f"{name} {str(v)[:30]} must be a whole number from 1 to "
                                      f"{LIMITS.get(name, 1 << 24)}: the model's metadata is damaged")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise CheckpointError(f"norm_eps {self.norm_eps} must be a small positive number")
        if self.activation not in ("silu", "relu"):
            raise UnsupportedModelError(f"activation {str(self.activation)[:30]!r} is not supported (silu, relu)")
        if len(self.n_kv_heads) != self.n_layers:
            raise UnsupportedModelError(
                f"n_kv_heads lists {len(self.n_kv_heads)} layers but the model has {self.n_layers}")
        for kv in self.n_kv_heads:
            if kv <= 0 or self.n_heads % kv:
                raise UnsupportedModelError(
                    f"{self.n_heads} attention heads cannot be grouped over {kv} key/value heads")

    # ---- derived facts (cheap, computed from fields) ----
    @property
    def gated(self) -> bool:
        """SwiGLU-style FFN (gate, up, down) rather than a plain MLP (up, down)."""
        return self.arch in ("llama", "qwen2")

    @property
    def norm(self) -> str:
        return "layer" if self.arch == "opt" else "rms"

    @property
    def attn_qkv_bias(self) -> bool:
        return self.arch in ("qwen2", "opt")

    @property
    def attn_out_bias(self) -> bool:
        return self.arch == "opt"

    @property
    def learned_positions(self) -> bool:
        return self.arch == "opt"

    @property
    def position_offset(self) -> int:
        """OPT's learned position table starts at index 2 (a quirk of its training code)."""
        return 2 if self.arch == "opt" else 0

    def kv_layer_bytes_per_token(self, itemsize: int = 2) -> list[int]:
        """Bytes of key+value cache one token costs in each layer (by that layer's key/value heads;
        f16 values, as the engine's cache holds them): the one formula the KV cache's size is
        computed from."""
        return [2 * kv * self.head_dim * itemsize for kv in self.n_kv_heads]

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """Bytes of key+value cache one token costs across all layers."""
        return sum(self.kv_layer_bytes_per_token(itemsize))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["n_kv_heads"] = list(self.n_kv_heads)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a manifest dict; unknown keys (from newer writers) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["n_kv_heads"] = tuple(kw["n_kv_heads"])
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
        return cls(**kw)
