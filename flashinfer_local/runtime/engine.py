"""The engine: a bundle opened for inference (weights, FFN backend, model, tokenizer)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from storage import format as fmt
from storage.errors import FlashinferError
from storage.reader import Bundle
from storage.window_cache import EVICT

from flashinfer_local.runtime.budget import in_dram_bytes, plan_budget
from flashinfer_local.runtime.dram import make_dram_ffn
from flashinfer_local.kernels import QuantMatrix
from flashinfer_local.runtime.sampling import SamplingParams, Sampler, Step, decode_loop
from flashinfer_local.runtime.rss import PeakRSS, rss_bytes
from flashinfer_local.models import build_model
from flashinfer_local.models.common import KVCache
from flashinfer_local.runtime.selection import make_selector, selector_bytes
from flashinfer_local.runtime.streaming import MAX_GAP_BYTES, StreamingFFN
from flashinfer_local.runtime.tokenizer import Tokenizer
from flashinfer_local.units import fmt_bytes

log = logging.getLogger(__name__)


def _dense_weights(bundle: Bundle) -> dict:
    """Dense tensors as torch tensors in the bundle's precision, or for an int8/int4 bundle's
    quantized matrices a QuantMatrix: zero-copy views of the map either way."""
    quantized = set(bundle.quantized_dense)
    w = {}
    for name in fmt.dense_tensor_names(bundle.config):
        a = bundle.dense(name)
        w[name] = QuantMatrix(a, bundle.dense(name + ".scale")) if name in quantized else torch.from_numpy(a)
    return w


OFFLOAD_MODES = ("none", "window", "naive")


class Engine:
    """A bundle ready to generate.

    offload: "none" holds every FFN record in DRAM; "window" streams records from the SSD into a
    sliding-window cache; "naive" reads every selected record for every token (the paper's baseline);
    None picks "none" when the whole bundle fits ``dram_budget`` (or no budget is given), else
    "window". ``evict`` picks what the window cache keeps when the selections outgrow it (see
    ``storage.window_cache``); ``read_gap`` (bytes) how far apart
    two wanted runs of records may be and still be read with one request. ``dram_budget`` (bytes) counts everything the engine holds for the
    model; the runtime's own baseline (interpreter, torch) is measured before the model is opened
    and reported apart.
    """

    def __init__(self, path: str | Path, threads: int | None = None, offload: str | None = None,
                 dram_budget: int | None = None, window: int = 4, io_threads: int = 8,
                 selector: str = "all", sparsity: float | None = None, context: int = 2048,
                 direct: bool = True, evict: str = "recency", read_gap: int = MAX_GAP_BYTES,
                 predictor: str | None = None):
        torch.set_num_threads(threads or min(os.cpu_count() or 1, 8))
        if offload != "none":
            from flashinfer_local.kernels import warm_up
            warm_up()
        self.runtime_baseline_bytes = rss_bytes()
        self.bundle = Bundle(path)
        self.config = cfg = self.bundle.config
        self.context = min(context, cfg.max_position)
        if offload not in (None, *OFFLOAD_MODES):
            raise FlashinferError(f"--offload {offload} is not known (choose {', '.join(OFFLOAD_MODES)})")
        if evict not in EVICT:
            raise FlashinferError(f"--evict {evict} is not known (choose {', '.join(EVICT)})")
        if window < 1:
            raise FlashinferError(f"--window {window} must be at least 1 token")
        sizes = self.bundle.sizes()
        sel_bytes = selector_bytes(selector, self.bundle, predictor)
        in_dram = in_dram_bytes(cfg, sizes["total_bytes"], sizes["tokenizer_bytes"], self.context) + sel_bytes
        if offload is None:
            offload = "none" if dram_budget is None or dram_budget >= in_dram else "window"
        if offload == "none" and dram_budget is not None and dram_budget < in_dram:
            raise FlashinferError(f"--dram-budget {fmt_bytes(dram_budget)} cannot hold this model in DRAM "
                                  f"(needs about {fmt_bytes(in_dram)}); use --offload window")
        self.offload, self.dram_budget = offload, dram_budget
        self.tokenizer = Tokenizer(self.bundle)
        self.weights = _dense_weights(self.bundle)
        self.plan = None
        if offload == "none":      # a selector masks each token's neurons (quality as decode sees it)
            self.selector = make_selector(selector, self.bundle, sparsity, predictor)
            self.ffn = make_dram_ffn(self.bundle, None if selector == "all" else self.selector)
        else:
            self.plan = plan_budget(self.bundle, dram_budget if dram_budget is not None else 1 << 62,
                                    self.context, offload, sel_bytes)
            self.selector = make_selector(selector, self.bundle, sparsity, predictor)
            self.ffn = StreamingFFN(self.bundle, self.plan, offload, window, self.selector,
                                    io_threads=io_threads, direct=direct, evict=evict, read_gap=read_gap)
        self.model = build_model(cfg, self.weights, self.ffn)

    def new_cache(self, capacity: int) -> KVCache:
        limit = self.config.max_position if self.plan is None else self.context
        if capacity > limit:
            raise FlashinferError(f"prompt + --max-tokens = {capacity} tokens exceeds the "
                                  f"{'model' if self.plan is None else 'planned'} context of {limit}; "
                                  "shorten the prompt or lower --max-tokens"
                                  + ("" if self.plan is None else ", or raise --context"))
        return KVCache(self.config, capacity)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        if self.plan is not None:
            self.ffn.start_token()
        return self.model.forward(tokens, pos, cache, last_only)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of one forward over ``ids`` from an empty cache."""
        return self.forward(torch.tensor(ids), 0, self.new_cache(len(ids)), last_only=False)

    def encode_prompt(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def resident(self) -> dict:
        """Bytes held per owner, as planned (the dense part whole but for an untied embedding's
        untouched rows, see budget.py)."""
        if self.plan is None:
            return {"dense_bytes": self.bundle.sizes()["dense_bytes"], "ffn_dram_bytes": self.ffn.nbytes,
                    "selector_bytes": self.selector.nbytes}
        return {"dense_bytes": self.plan.dense_bytes, "tokenizer_bytes": self.plan.tokenizer_bytes,
                "window_cache_bytes": self.ffn.cache_bytes,
                "buffer_bytes": self.ffn.buffer_bytes, "selector_bytes": self.selector.nbytes}

    def _stream_stats(self, st, c_prefill: dict, c_end: dict, kv_bytes: int) -> dict:
        out = {"offload": self.offload, "dram_budget_bytes": self.dram_budget,
               "runtime_baseline_bytes": self.runtime_baseline_bytes, "kv_cache_bytes": kv_bytes,
               **self.resident()}
        if self.plan is None:
            return out
        n = max(st.decode_steps, 1)
        d = {k: c_end[k] - c_prefill[k] for k in c_end}
        ops = c_end["read_ops"]
        out.update({
            "selector": self.selector.name,
            "cache_rows_per_layer": self.plan.cache_rows_per_layer,
            "flash_bytes_read": c_end["flash_bytes_read"], "read_ops": ops,
            "mean_read_bytes": c_end["flash_bytes_read"] / ops if ops else 0,
            "flash_bytes_per_token": d["flash_bytes_read"] / n,
            "gap_bytes_per_token": d["gap_bytes_read"] / n,     # part of the above read through gaps
            "cache_hit_rate": d["hits"] / d["lookups"] if d["lookups"] else 0.0,
            "ms_per_token": {k[:-2]: 1000 * d[k] / n for k in ("io_wait_s", "bookkeeping_s", "compute_s",
                                                              "selection_s")},
        })
        return out

    def generate(self, prompt: str | list[int], max_tokens: int = 128,
                 sampling: SamplingParams | None = None, chat: bool = False,
                 stop_at_eos: bool = True) -> Iterator[Step]:
        """Yield generated tokens one by one (each a :class:`Step` with its text and live stats)."""
        ids = self.encode_prompt(prompt, chat)
        sampler = Sampler(sampling or SamplingParams())
        detok = self.tokenizer.decode if self.tokenizer.available else None
        eos = self.tokenizer.eos_token_ids if stop_at_eos else frozenset()
        counters = self.ffn.counters if self.plan is not None else dict
        c_prefill = None
        with PeakRSS() as peak, torch.inference_mode():
            steps = decode_loop(self.forward, self.new_cache, ids, max_tokens, sampler, eos,
                                detok, on_token=peak.sample)
            for step in steps:
                c = counters()
                if c_prefill is None:
                    c_prefill = c
                st = step.stats
                st.peak_rss_bytes = peak.peak
                st.extra = self._stream_stats(st, c_prefill, c, (len(ids) + max_tokens) *
                                              self.config.kv_bytes_per_token())
                yield step

    def close(self) -> None:
        if self.plan is not None:
            self.ffn.close()
        self.bundle.close()
