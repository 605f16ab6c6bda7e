"""Tiny random recursive (shared-weight) checkpoints and their transformers reference.

Plain helper module (not a conftest). Public API::

    make_recursive_checkpoint(out_dir, arch, layer_map=LAYER_MAP, seed=0, tied=True) -> Path
    reference_model(ckpt_dir) -> torch.nn.Module

A recursive checkpoint is what ``storage.hf_source`` converts: config.json with
``num_hidden_layers`` = the number of layer positions and ``layer_map`` (the stored layer each
position runs), and model.safetensors holding the stored layers only, as ``model.layers.{i}``
for i = 0 .. max(layer_map) (OPT: ``model.decoder.layers.{i}``). The reference is the ordinary
transformers model of that depth whose positions sharing a stored layer share its parameters
(tied, so each position still has its own attention module and KV cache entry).

``tied=False`` writes the same weights untied: every position's copy stored apart and no layer
map (the model a recursive one is compared with: the same function, depth-many stored layers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import tiny_models as tm

# layer 0 alone, then a block of two layers (1, 2) run three times: the middle-cycle sharing of
# Mixture-of-Recursions. Gemma 3's stored layers 0 and 1 are local, 2 is global.
LAYER_MAP = (0, 1, 2, 1, 2, 1, 2)
ARCHS = ("llama", "qwen2", "opt", "gemma3")
STORED_TYPES = ("sliding_attention", "sliding_attention", "full_attention")   # gemma3, per stored layer


def _layers(model) -> torch.nn.ModuleList:
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def _prefix(model) -> str:
    return "model.decoder.layers." if hasattr(model.model, "decoder") else "model.layers."


def _config(arch: str, depth: int, layer_map):
    bos, eos = 0, 1                                   # tiny_models' special token ids
    cfg = {"llama": lambda: tm._llama_config(False, bos, eos), "qwen2": lambda: tm._qwen2_config(bos, eos),
           "opt": lambda: tm._opt_config(bos, eos), "gemma3": lambda: tm._gemma3_config(bos, eos)}[arch]()
    cfg.num_hidden_layers = depth
    if arch == "gemma3":
        cfg.layer_types = [STORED_TYPES[i] for i in layer_map]
    elif getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[0]] * depth
    cfg.dtype = torch.float32
    return cfg


def _tie(model, layer_map) -> None:
    """Positions that share a stored layer share the parameters of its first position."""
    layers = _layers(model)
    for at, i in enumerate(layer_map):
        first = layer_map.index(i)
        if first == at:
            continue
        for name, param in layers[first].named_parameters():
            owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(layers[at].get_submodule(owner), leaf, param)


def _build(arch: str, layer_map) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    cfg = _config(arch, len(layer_map), layer_map)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _tie(model, layer_map)
    return model.float().eval()


def make_recursive_checkpoint(out_dir: Path, arch: str, layer_map=LAYER_MAP, seed: int = 0,
                              tied: bool = True) -> Path:
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tm._write_tokenizer(out_dir, tm.VOCAB_SIZE)
    torch.manual_seed(seed)
    model = _build(arch, layer_map)
    tm._randomize(model, seed)                        # (each shared parameter once)
    pre, state = _prefix(model), {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if tied and k.startswith(pre):
            at, rest = k[len(pre):].split(".", 1)
            i = layer_map[int(at)]
            if layer_map.index(i) != int(at):
                continue                               # a shared copy: stored once, under its stored layer
            k = f"{pre}{i}.{rest}"
        state[k] = v.detach().contiguous().clone()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    if tied:
        cfg["layer_map"] = list(layer_map)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    return out_dir


def reference_model(ckpt_dir: Path) -> torch.nn.Module:
    """The transformers model of a recursive checkpoint: its depth, shared layers tied."""
    from safetensors.torch import load_file
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2", "opt": "opt", "gemma3_text": "gemma3"}[cfg["model_type"]]
    layer_map = tuple(cfg.get("layer_map") or range(cfg["num_hidden_layers"]))
    model = _build(arch, layer_map)
    pre, state = _prefix(model), {}
    for k, v in load_file(str(Path(ckpt_dir) / "model.safetensors")).items():
        if k.startswith(pre):
            i, rest = k[len(pre):].split(".", 1)
            k = f"{pre}{layer_map.index(int(i))}.{rest}"
        state[k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = {f"{pre}{at}." for at, i in enumerate(layer_map) if layer_map.index(i) != at}
    left = [k for k in missing if not any(k.startswith(s) for s in shared) and k != "lm_head.weight"]
    assert not unexpected and not left, (unexpected, left)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.float().eval()
