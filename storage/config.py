"""The normalized model configuration shared by every architecture.

Sources (HF ``config.json`` or GGUF metadata) are parsed into one frozen :class:`ModelConfig`; the
bundle manifest stores it as JSON and the engine builds its model from it. Architecture families:

- ``llama``: Llama 1/2/3, Mistral-style, SmolLM, DeciLM (per-layer KV heads). RMSNorm, RoPE, SwiGLU.
- ``qwen2``: as llama plus biases on q/k/v and (usually) an untied head.
- ``opt``: LayerNorm, learned positions (offset 2), ReLU MLP with biases everywhere.
- ``gemma3``: RMSNorm before and after attention and FFN, query/key RMSNorms, a GeGLU FFN (tanh
  gelu), the embedding scaled by sqrt(d_model), a tied head, and sliding-window attention on most
  layers (``sliding_layers``; their rotary base ``rope_local_theta``) with periodic global layers.

Recursive (shared-weight) models: ``layer_map`` lists, for each layer position from the input up,
the stored layer it runs, so one stored block of layers can serve several depths (Mixture-of-
Recursions' shared blocks). Everything indexed by layer (tensors, FFN records, windows, predictors,
``n_kv_heads``, ``sliding_layers``) counts stored layers; the KV cache is kept per position
(``stack``). Without a map each position runs its own layer.

Norm weights are stored as the factor the normalized value is multiplied by: Gemma's checkpoints
keep ``w`` for a factor ``1 + w``, and the HF converter adds the one (GGUF files already carry it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import CheckpointError, UnsupportedModelError

ARCHS = ("llama", "qwen2", "opt", "gemma3")
ACTIVATIONS = ("silu", "relu", "gelu_tanh")
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
    activation: str = "silu"       # silu (gated), relu (OPT), gelu_tanh (gated: Gemma's GeGLU)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None       # keys a local layer's query sees (itself included)
    sliding_layers: tuple[int, ...] = ()    # the layers whose attention is local (sliding_window)
    rope_local_theta: float | None = None   # rotary base of the local layers (None: rope_theta)
    attn_scale: float | None = None         # query scaling (None: head_dim ** -0.5)
    layer_map: tuple[int, ...] = ()         # the stored layer each position runs (() : position i runs i)

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
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"activation {str(self.activation)[:30]!r} is not supported "
                                        f"({', '.join(ACTIVATIONS)})")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
                self.sliding_window, int) or not 1 <= self.sliding_window <= LIMITS["max_position"]):
            raise CheckpointError(f"sliding_window {str(self.sliding_window)[:30]} must be a whole number of "
                                  "tokens: the model's metadata is damaged")
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.sliding_layers) or (
                self.sliding_layers and self.sliding_window is None):
            raise CheckpointError(f"sliding_layers {str(self.sliding_layers)[:40]} must name layers below "
                                  f"{self.n_layers}, with a sliding_window: the model's metadata is damaged")
        if self.layer_map and (len(self.layer_map) > LIMITS["n_layers"] or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.layer_map)
                or len(set(self.layer_map)) != self.n_layers):
            raise CheckpointError(f"layer_map {str(list(self.layer_map))[:60]} must list, for up to "
                                  f"{LIMITS['n_layers']} positions, stored layers below {self.n_layers}, each "
                                  "of them at least once: the model's metadata is damaged")
        if len(self.n_kv_heads) != self.n_layers:
            raise UnsupportedModelError(
                f"n_kv_heads lists {len(self.n_kv_heads)} layers but the model has {self.n_layers}")
        for kv in self.n_kv_heads:
            if kv <= 0 or self.n_heads % kv:
                raise UnsupportedModelError(
                    f"{self.n_heads} attention heads cannot be grouped over {kv} key/value heads")

    # ---- derived facts (cheap, computed from fields) ----
    @property
    def stack(self) -> tuple[int, ...]:
        """The stored layer run at each position, from the input up (``layer_map``, or each its own)."""
        return self.layer_map or tuple(range(self.n_layers))

    @property
    def depth(self) -> int:
        """Layer positions a token passes through (more than ``n_layers`` when layers are shared)."""
        return len(self.stack)

    def uses(self, layer: int) -> int:
        """Positions that run stored layer ``layer`` (1 without a layer map)."""
        return self.stack.count(layer)

    @property
    def gated(self) -> bool:
        """SwiGLU-style FFN (gate, up, down) rather than a plain MLP (up, down)."""
        return self.arch in ("llama", "qwen2", "gemma3")

    @property
    def qk_norm(self) -> bool:
        """RMSNorm of each query and key head before the rotation (Gemma 3)."""
        return self.arch == "gemma3"

    @property
    def post_norms(self) -> bool:
        """RMSNorm of the attention's and the FFN's outputs before the residual add (Gemma 3)."""
        return self.arch == "gemma3"

    @property
    def embed_scale(self) -> float:
        """The factor embedding rows are multiplied by (Gemma: sqrt(d_model))."""
        return self.d_model ** 0.5 if self.arch == "gemma3" else 1.0

    def window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` attends to (itself included), or None for the whole context."""
        return self.sliding_window if layer in self.sliding_layers else None

    def local_rope(self, layer: int) -> bool:
        """Whether ``layer`` rotates with the local base ``rope_local_theta`` (and no context scaling)."""
        return self.rope_local_theta is not None and layer in self.sliding_layers

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
        """Bytes of key+value cache one token costs at each position (``stack``, by its layer's
        key/value heads; f16 values, as the engine's cache holds them): the one formula the KV
        cache's size is computed from (a local layer holds only its window's tokens:
        ``runtime.budget.kv_layer_bytes``)."""
        return [2 * self.n_kv_heads[i] * self.head_dim * itemsize for i in self.stack]

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """Bytes of key+value cache one token costs across all positions."""
        return sum(self.kv_layer_bytes_per_token(itemsize))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["n_kv_heads"] = list(self.n_kv_heads)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["sliding_layers"] = list(self.sliding_layers)
        d["layer_map"] = list(self.layer_map)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a manifest dict; unknown keys (from newer writers) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["n_kv_heads"] = tuple(kw["n_kv_heads"])
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
        kw["sliding_layers"] = tuple(kw.get("sliding_layers") or ())
        kw["layer_map"] = tuple(kw.get("layer_map") or ())
        return cls(**kw)
