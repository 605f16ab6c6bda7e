"""Hugging Face checkpoint folders: config.json + *.safetensors (sharded or not) + tokenizer files."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, UnsupportedModelError
from .source import Source, TokenizerInfo

log = logging.getLogger(__name__)

# model_type -> our architecture family
FAMILIES = {"llama": "llama", "mistral": "llama", "deci": "llama", "qwen2": "qwen2", "opt": "opt",
            "gemma3_text": "gemma3"}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# checkpoint tensors that carry nothing we need (recomputed buffers)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _config(c: dict) -> ModelConfig:
    cfg = _layer_config(c)
    return cfg if c.get("layer_map") is None else _shared(cfg, c["layer_map"])


def _shared(cfg: ModelConfig, layer_map) -> ModelConfig:
    """A recursive checkpoint's config: ``layer_map`` (config.json) lists the stored layer each of
    the ``num_hidden_layers`` positions runs; the positions sharing a layer must agree on its
    key/value heads and on whether it is local. The config's per-layer facts become per stored layer."""
    if not isinstance(layer_map, list) or len(layer_map) != cfg.n_layers or not all(
            type(i) is int and 0 <= i < cfg.n_layers for i in layer_map):
        raise CheckpointError(f"config.json's layer_map {str(layer_map)[:60]} must list, for each of the "
                              f"{cfg.n_layers} layers (num_hidden_layers), the stored layer it runs (0 to "
                              f"{cfg.n_layers - 1})")
    stored = max(layer_map) + 1
    first = {}
    for at, i in enumerate(layer_map):
        j = first.setdefault(i, at)
        if (cfg.n_kv_heads[at], cfg.window(at)) != (cfg.n_kv_heads[j], cfg.window(j)):
            raise CheckpointError(f"layers {j} and {at} share stored layer {i} (layer_map) but differ in "
                                  "their key/value heads or attention window")
    missing = sorted(set(range(stored)) - set(first))
    if missing:
        raise CheckpointError(f"layer_map never runs stored layer {missing[0]}: number the stored layers 0 to "
                              f"{len(first) - 1}")
    return dataclasses.replace(cfg, n_layers=stored, n_kv_heads=tuple(cfg.n_kv_heads[first[i]] for i in range(stored)),
                               sliding_layers=tuple(i for i in range(stored) if first[i] in cfg.sliding_layers),
                               layer_map=tuple(layer_map))


def _layer_config(c: dict) -> ModelConfig:
    mt = c.get("model_type")
    arch = FAMILIES.get(mt)
    if arch is None:
        raise UnsupportedModelError(
            f"model_type '{mt}' is not supported (supported: {', '.join(sorted(FAMILIES))})")
    eos = c.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    n_layers = c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    if arch == "opt":
        if not c.get("do_layer_norm_before", True):
            raise UnsupportedModelError("OPT with do_layer_norm_before=false (opt-350m) is not supported")
        if c.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"]:
            raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size is not supported")
        if c.get("activation_function", "relu") != "relu":
            raise UnsupportedModelError(
                f"OPT activation '{c.get('activation_function')}' is not supported (relu only)")
        return ModelConfig(
            arch="opt", vocab_size=c["vocab_size"], d_model=c["hidden_size"], d_ff=c["ffn_dim"],
            n_layers=n_layers, n_heads=heads, n_kv_heads=(heads,) * n_layers,
            head_dim=c["hidden_size"] // heads, max_position=c["max_position_embeddings"],
            norm_eps=1e-5, tie_embeddings=c.get("tie_word_embeddings", True), activation="relu",
            bos_token_id=c.get("bos_token_id"), eos_token_ids=eos)
    act = c.get("hidden_activation" if arch == "gemma3" else "hidden_act") or "silu"
    if ACTIVATIONS.get(act) != ("gelu_tanh" if arch == "gemma3" else "silu"):
        raise UnsupportedModelError(f"{mt} with activation '{act}' is not supported "
                                    f"({'gelu_pytorch_tanh' if arch == 'gemma3' else 'silu'} only)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(cap):
            raise UnsupportedModelError(f"{mt} with {cap}={c[cap]} is not supported (Gemma 3 has none)")
    kv = c.get("num_key_value_heads_per_layer")
    if kv is None:
        kv = [c.get("num_key_value_heads") or heads] * n_layers
    # transformers >= 5 writes rope settings into "rope_parameters"; older configs use top-level keys
    rp = c.get("rope_parameters") or {}
    local_theta = None
    if arch == "gemma3":       # one rope setting per layer type
        full, local = rp.get("full_attention", rp), rp.get("sliding_attention", {})
        local_theta = local.get("rope_theta", c.get("rope_local_base_freq", 10000.0))
        rp = full
    theta = c.get("rope_theta", rp.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype == "default":
            scaling = None
        elif rtype not in ("linear", "llama3"):
            raise UnsupportedModelError(f"rope_scaling type '{rtype}' is not supported (linear, llama3)")
        else:
            scaling = {**scaling, "rope_type": rtype}
    window, local_layers = _sliding(c, arch, n_layers)
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return ModelConfig(
        arch=arch, vocab_size=c["vocab_size"], d_model=c["hidden_size"],
        d_ff=c["intermediate_size"], n_layers=n_layers, n_heads=heads, n_kv_heads=tuple(kv),
        head_dim=head_dim, max_position=c.get("max_position_embeddings", 2048),
        norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=c.get("tie_word_embeddings", arch == "gemma3"), activation=ACTIVATIONS[act],
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos, sliding_window=window,
        sliding_layers=local_layers, rope_local_theta=local_theta,
        attn_scale=c["query_pre_attn_scalar"] ** -0.5 if arch == "gemma3" and c.get("query_pre_attn_scalar") else None)


def _sliding(c: dict, arch: str, n_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(window, local layers) from ``layer_types`` (transformers >= 4.53), Gemma 3's older
    ``sliding_window_pattern``, Qwen2's ``use_sliding_window`` from ``max_window_layers`` on, or a
    Mistral-style ``sliding_window`` on every layer."""
    window = c.get("sliding_window")
    if not window or (arch == "qwen2" and not c.get("use_sliding_window")):
        return None, ()
    types = c.get("layer_types")
    if types:
        return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if arch == "gemma3":
        every = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
        return window, tuple(i for i in range(n_layers) if (i + 1) % every)
    if arch == "qwen2":
        return window, tuple(range(c.get("max_window_layers", 0), n_layers))
    return window, tuple(range(n_layers))


def _name_map(cfg: ModelConfig, keys: set[str]) -> dict[str, str]:
    """canonical name -> checkpoint tensor name."""
    m = {}
    if cfg.arch == "opt":
        pre = "model.decoder." if any(k.startswith("model.decoder.") for k in keys) else "decoder."
        m["embed"] = pre + "embed_tokens.weight"
        m["pos_embed"] = pre + "embed_positions.weight"
        for s in ("weight", "bias"):
            m[f"final_norm.{s}"] = pre + f"final_layer_norm.{s}"
        for i in range(cfg.n_layers):
            p, q = f"{pre}layers.{i}.", f"layers.{i}."
            for s in ("weight", "bias"):
                m[q + f"attn_norm.{s}"] = p + f"self_attn_layer_norm.{s}"
                m[q + f"ffn_norm.{s}"] = p + f"final_layer_norm.{s}"
                for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    m[q + f"{a}.{s}"] = p + f"self_attn.{b}.{s}"
            m[q + "up"], m[q + "up_bias"] = p + "fc1.weight", p + "fc1.bias"
            m[q + "down"], m[q + "down_bias"] = p + "fc2.weight", p + "fc2.bias"
    else:
        m["embed"] = "model.embed_tokens.weight"
        m["final_norm.weight"] = "model.norm.weight"
        for i in range(cfg.n_layers):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            m[q + "attn_norm.weight"] = p + "input_layernorm.weight"
            m[q + "ffn_norm.weight"] = p + "post_attention_layernorm.weight"
            for a in "qkvo":
                for s in ("weight", "bias"):
                    m[q + f"{a}.{s}"] = p + f"self_attn.{a}_proj.{s}"
            for a in ("gate", "up", "down"):
                m[q + a] = p + f"mlp.{a}_proj.weight"
            if cfg.arch == "gemma3":
                m[q + "post_attn_norm.weight"] = p + "post_attention_layernorm.weight"
                m[q + "ffn_norm.weight"] = p + "pre_feedforward_layernorm.weight"
                m[q + "post_ffn_norm.weight"] = p + "post_feedforward_layernorm.weight"
                m[q + "q_norm.weight"] = p + "self_attn.q_norm.weight"
                m[q + "k_norm.weight"] = p + "self_attn.k_norm.weight"
    m["lm_head"] = "lm_head.weight"
    return m


def _token_text(t) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


class HFSource(Source):
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            raw = json.loads((self.path / "config.json").read_text())
        except ValueError as e:
            raise CheckpointError(f"{self.path / 'config.json'}: not valid JSON ({e})") from None
        self.config = _config(raw)
        self._files = self._tensor_files()
        self._map = _name_map(self.config, set(self._files))
        known = set(self._map.values())
        unknown = [k for k in self._files if k not in known and not k.endswith(IGNORED_SUFFIXES)]
        if unknown:
            raise UnsupportedModelError(
                f"{self.path}: checkpoint tensor '{unknown[0]}' (and {len(unknown) - 1} more) has no "
                f"place in a {self.config.arch} model; " + (
                    f"a recursive checkpoint stores its {self.config.n_layers} shared layers once, as layers 0 to "
                    f"{self.config.n_layers - 1} (config.json's layer_map)" if self.config.layer_map
                    else "this variant is not supported"))
        if self.config.tie_embeddings is False and "lm_head.weight" not in self._files:
            log.info("no lm_head.weight in checkpoint: tying the head to the embeddings")
            self.config = ModelConfig.from_dict({**self.config.to_dict(), "tie_embeddings": True})
        size = sum(f.stat().st_size for f in set(self._files.values()))
        self.identity = {"kind": "hf", "name": self.path.name, "path": str(self.path.resolve()),
                         "bytes": size, "mtime": max(f.stat().st_mtime for f in set(self._files.values()))}
        self.tokenizer = self._tokenizer()
        self._open = {}

    def _tensor_files(self) -> dict[str, Path]:
        from safetensors import safe_open
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            files = {k: self.path / v for k, v in wm.items()}
            for f in set(files.values()):
                if not f.exists():
                    raise CheckpointError(f"{index}: shard {f.name} is missing")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no *.safetensors files (PyTorch .bin checkpoints are "
                                  "not supported; re-save with safe_serialization=True)")
        files = {}
        for s in shards:
            try:
                with safe_open(s, framework="pt") as f:
                    for k in f.keys():
                        files[k] = s
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{s}: unreadable safetensors file ({e})") from None
        return files

    def _tokenizer(self) -> TokenizerInfo:
        tj = self.path / "tokenizer.json"
        info = TokenizerInfo(tokenizer_json=tj.read_text() if tj.exists() else None)
        tc = self.path / "tokenizer_config.json"
        if tc.exists():
            c = json.loads(tc.read_text())
            tmpl = c.get("chat_template")
            if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
                tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
            info.chat_template = tmpl
            info.bos_token = _token_text(c.get("bos_token"))
            info.eos_token = _token_text(c.get("eos_token"))
        jinja = self.path / "chat_template.jinja"
        if jinja.exists():
            info.chat_template = jinja.read_text()
        return info

    def has(self, name: str) -> bool:
        return self._map.get(name) in self._files

    def load(self, name: str) -> np.ndarray:
        from safetensors import safe_open
        key = self._map.get(name)
        if key not in self._files:
            raise CheckpointError(f"{self.path}: tensor '{key or name}' is missing from the checkpoint")
        f = self._files[key]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="pt")
        try:
            t = self._open[f].get_slice(key)[:]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor '{key}' ({e}); the file may be truncated") from None
        t = t.float().numpy()
        if self.config.arch == "gemma3" and name.endswith("norm.weight"):
            t = t + np.float32(1)          # Gemma keeps w for a factor 1 + w (storage.config)
        return t

    def close(self) -> None:
        self._open.clear()
