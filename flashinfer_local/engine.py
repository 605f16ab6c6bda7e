"""The engine: a bundle opened for inference (weights, FFN backend, model, tokenizer)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from storage.reader import Bundle

from .ffn import DenseFFN
from .generate import SamplingParams, Sampler, Step, decode_loop
from .memory import PeakRSS, rss_bytes
from .models import build_model
from .models.common import KVCache
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _dense_weights(bundle: Bundle) -> dict[str, torch.Tensor]:
    """Dense tensors as torch tensors in the bundle's precision: zero-copy views of the map."""
    from storage import format as fmt
    w = {}
    for name in fmt.dense_tensor_names(bundle.config):
        a = bundle.dense(name)
        w[name] = torch.from_numpy(a)
    return w


class Engine:
    """A bundle ready to generate. ``Engine(path)`` validates the bundle and loads it (all in DRAM)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        torch.set_num_threads(threads or min(os.cpu_count() or 1, 8))
        self.runtime_baseline_bytes = rss_bytes()
        self.bundle = Bundle(path)
        self.config = self.bundle.config
        self.tokenizer = Tokenizer(self.bundle)
        self.weights = _dense_weights(self.bundle)
        self.ffn = DenseFFN(self.bundle)
        self.model = build_model(self.config, self.weights, self.ffn)

    def new_cache(self, capacity: int) -> KVCache:
        limit = self.config.max_position
        if capacity > limit:
            from storage.errors import FlashinferError
            raise FlashinferError(f"prompt + --max-tokens = {capacity} tokens exceeds the model's "
                                  f"context of {limit}; shorten the prompt or lower --max-tokens")
        return KVCache(self.config, capacity)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        return self.model.forward(tokens, pos, cache, last_only)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of one forward over ``ids`` from an empty cache."""
        return self.model.forward(torch.tensor(ids), 0, self.new_cache(len(ids)), last_only=False)

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompt: str | list[int], max_tokens: int = 128,
                 sampling: SamplingParams | None = None, chat: bool = False,
                 stop_at_eos: bool = True) -> Iterator[Step]:
        """Yield generated tokens one by one (each a :class:`Step` with its text and live stats)."""
        ids = self.encode_prompt(prompt, chat)
        sampler = Sampler(sampling or SamplingParams())
        detok = self.tokenizer.decode if self.tokenizer._tok is not None else None
        eos = self.tokenizer.eos_token_ids if stop_at_eos else frozenset()
        with PeakRSS() as peak, torch.inference_mode():
            steps = decode_loop(self.forward, self.new_cache, ids, max_tokens, sampler, eos,
                                detok, on_token=peak.sample)
            for step in steps:
                step.stats.peak_rss_bytes = peak.peak
                yield step

    def close(self) -> None:
        self.bundle.close()
