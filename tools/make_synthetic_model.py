#!/usr/bin/env python3
"""Write a bundle of a model with real shapes and random weights, to run the engine at laptop scale.

    python tools/make_synthetic_model.py OUT [--shape qwen2-7b] [--dtype f16] [--seed 0] [--untie]

Shapes: qwen2-7b (28 layers, d_model 3584, d_ff 18944, 28 heads / 4 KV heads, vocab 152064, about
15 GB in f16), tiny (for checking the tool), recursive (a shared-weight model: 3 stored layers,
d_model 1024, d_ff 4096, run at 7 positions as 0 1 2 1 2 1 2). ``--untie`` writes a recursive
shape's same weights at every position, without the layer map: the same model stored untied. Weights are N(0, 0.02) with unit norms, generated tensor
by tensor and streamed through the normal converter, so memory stays about one tensor. There is no
tokenizer: drive it with token ids. Random weights give no real activation statistics; use this for
speed and memory figures only.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.config import ModelConfig  # noqa: E402
from storage.convert import convert, dense_specs  # noqa: E402
from storage.source import Source, TokenizerInfo  # noqa: E402

SHAPES = {
    "qwen2-7b": dict(arch="qwen2", vocab_size=152064, d_model=3584, d_ff=18944, n_layers=28, n_heads=28,
                     n_kv_heads=(4,) * 28, head_dim=128, max_position=32768, norm_eps=1e-6,
                     rope_theta=1e6, tie_embeddings=False),
    "tiny": dict(arch="qwen2", vocab_size=512, d_model=64, d_ff=256, n_layers=2, n_heads=4,
                 n_kv_heads=(2, 2), head_dim=16, max_position=512, norm_eps=1e-6, tie_embeddings=False),
    "recursive": dict(arch="llama", vocab_size=4096, d_model=1024, d_ff=4096, n_layers=3, n_heads=16,
                      n_kv_heads=(4,) * 3, head_dim=64, max_position=2048, norm_eps=1e-5, tie_embeddings=False,
                      layer_map=(0, 1, 2, 1, 2, 1, 2)),
}


class RandomSource(Source):
    """Every canonical tensor drawn from N(0, 0.02) (norm weights 1), seeded by name; ``alias``: the
    layer whose draws each layer takes (an untied copy of a recursive model's shared layers)."""

    def __init__(self, cfg: ModelConfig, seed: int, alias: tuple[int, ...] | None = None):
        self.config, self.seed, self.alias = cfg, seed, alias
        self.tokenizer = TokenizerInfo()
        self.identity = {"kind": "synthetic", "name": f"random-{cfg.arch}-seed{seed}", "path": "",
                         "bytes": 0, "mtime": 0}
        d, f = cfg.d_model, cfg.d_ff
        self.shapes = {n: s for n, _, s in dense_specs(cfg, "f32")}
        for i in range(cfg.n_layers):
            self.shapes.update({f"layers.{i}.gate": (f, d), f"layers.{i}.up": (f, d),
                                f"layers.{i}.down": (d, f)})

    def has(self, name: str) -> bool:
        return name in self.shapes

    def load(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if self.alias is not None and name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            name = f"layers.{self.alias[int(i)]}.{rest}"
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= 0.02
        return a


def untied(cfg: ModelConfig) -> tuple[ModelConfig, tuple[int, ...]]:
    """A recursive config as a plain one of its depth, and the stored layer each of its layers copies."""
    alias = cfg.stack
    return replace(cfg, n_layers=cfg.depth, n_kv_heads=tuple(cfg.n_kv_heads[i] for i in alias), layer_map=(),
                   sliding_layers=tuple(p for p, i in enumerate(alias) if i in cfg.sliding_layers)), alias


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="qwen2-7b")
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--untie", action="store_true", help="a recursive shape's weights stored at every position")
    a = ap.parse_args()
    cfg = ModelConfig(**SHAPES[a.shape])
    cfg, alias = untied(cfg) if a.untie else (cfg, None)
    print(convert(RandomSource(cfg, a.seed, alias), a.out, dtype=a.dtype, force=a.force, progress=True))


if __name__ == "__main__":
    main()
