#!/usr/bin/env python3
"""Write a bundle of a model with real shapes and random weights, to run the engine at laptop scale.

    python tools/make_synthetic_model.py OUT [--shape qwen2-7b] [--dtype f16] [--seed 0]

Shapes: qwen2-7b (28 layers, d_model 3584, d_ff 18944, 28 heads / 4 KV heads, vocab 152064, about
15 GB in f16), tiny (for checking the tool). Weights are N(0, 0.02) with unit norms, generated tensor
by tensor and streamed through the normal converter, so memory stays about one tensor. There is no
tokenizer: drive it with token ids. Random weights give no real activation statistics; use this for
speed and memory figures only.
"""
from __future__ import annotations

import argparse
import sys
import zlib
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
}


class RandomSource(Source):
    """Every canonical tensor drawn from N(0, 0.02) (norm weights 1), seeded by name."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.config, self.seed = cfg, seed
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
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= 0.02
        return a


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="qwen2-7b")
    ap.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    cfg = ModelConfig(**SHAPES[a.shape])
    print(convert(RandomSource(cfg, a.seed), a.out, dtype=a.dtype, force=a.force, progress=True))


if __name__ == "__main__":
    main()
