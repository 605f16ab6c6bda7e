"""The engine: a bundle opened for inference.

It owns the dense weights (views of the mapped file), the FFN backend (``backend.FFNBackend``: all
records in DRAM, or streamed from the SSD), the selector, the model and the tokenizer; the budget
plan (``budget.plan_budget``) decided how many bytes each may hold and which backend is built.

The per-token path, from ids to logits (``forward``, HOT):

    embed rows -> per layer: attention against the session's KV cache,
                             ffn_step: [gate values] -> selector.mask(x) -> observers
                                       -> backend(layer, x, mask[, gate])
               -> final norm -> head -> logits [T or 1, vocab]

Generation (sampling, detokenization, stop strings, a cache kept across calls) lives in
``runtime.session``; ``Engine.generate`` is a thin wrapper over a fresh session.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from predictors import plan_file
from predictors.placement import DEVICE, PINNED
from storage import format as fmt
from storage.errors import FlashinferError
from storage.reader import Bundle

from flashinfer_local.models import build_model
from flashinfer_local.models.common import KVCache, kv_itemsize, linear
from flashinfer_local.runtime import placed
from flashinfer_local.runtime.backend import FFNCounters, array_bytes
from flashinfer_local.runtime.budget import (PREFILL_TOKENS, Placed, Sizes, draft_model_bytes, kv_cache_bytes,
                                             plan_budget, selector_bytes)
from flashinfer_local.runtime.dram import make_dram_ffn
from flashinfer_local.runtime.options import EngineOptions
from flashinfer_local.runtime.rss import pin_malloc_thresholds, rss_bytes
from flashinfer_local.runtime.selection import AllSelector, dense_weight, make_selector
from flashinfer_local.runtime.streaming import StreamingFFN
from flashinfer_local.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _dense_weights(bundle: Bundle) -> dict:
    """Dense tensors as torch tensors in the bundle's precision, or for quantized matrices (an
    int8/int4 bundle's, a gate-split bundle's q8 gate) a QuantMatrix: zero-copy views of the map
    either way."""
    return {name: dense_weight(bundle, name) for name in fmt.dense_tensor_names(bundle.config, bundle.gate_split)}


def make_backend(bundle: Bundle, plan, opts: EngineOptions, placement=None):
    """The FFN backend the plan asks for (``placement``: a stored plan's (tiers, meta), window mode)."""
    if plan.mode == "none":
        return make_dram_ffn(bundle)
    pinned = None if placement is None else placed.pinned_ids(placement[0])
    ffn = StreamingFFN(bundle, plan, opts.window, io_threads=opts.io_threads, direct=opts.direct,
                       evict=opts.evict, read_gap=opts.read_gap, pinned=pinned, prompt_pin=opts.prompt_pin)
    if placement is not None and any((t == DEVICE).any() for t in placement[0]):
        return placed.PlacedFFN(ffn, placed.DevicePart(bundle, placement[0], placement[1]["device"]))
    return ffn


def stored_placement(bundle: Bundle, opts: EngineOptions):
    """(tiers, window rows, meta) of the bundle's stored placement, or None (none stored, or
    ``placement="none"``)."""
    if opts.placement == "none" or not plan_file.plan_path(bundle.path).exists():
        return None
    cfg = bundle.config
    return plan_file.load(bundle.path, bundle.manifest, cfg.n_layers, cfg.d_ff)


def placed_budget(bundle: Bundle, stored) -> Placed:
    """What a stored placement asks of the budget."""
    tiers, rows, meta = stored
    dev = sum(int((t == DEVICE).sum()) for t in tiers)
    per = (placed.device_bytes_per_neuron(bundle.config, meta["device"], bundle.gate_split)
           if meta["device"] == "cpu" else 0)
    return Placed(tuple(int((t == PINNED).sum()) for t in tiers), tuple(rows), dev * per, meta.get("dram_budget"))


class Engine:
    """A bundle ready to generate. ``options`` (an :class:`EngineOptions`, a dict, or keyword
    overrides such as ``offload="window", dram_budget=2 << 30``) say how: see EngineOptions for each.

    ``dram_budget`` (bytes) counts everything the engine holds for the model; the runtime's own
    baseline (interpreter, torch) is measured before the model is opened and reported apart.
    """

    def __init__(self, path: str | Path, options: EngineOptions | dict | None = None, *,
                 tokenizer: Tokenizer | None = None, **overrides):
        # tokenizer: one to share (a draft model uses its target's)
        self.options = opts = EngineOptions.of(options, **overrides)
        self._shared_tokenizer = tokenizer
        self.draft_engine = None
        torch.set_num_threads(opts.threads or min(os.cpu_count() or 1, 8))
        pin_malloc_thresholds()
        if opts.offload != "none" or opts.draft is not None:    # (a verification runs the T-token kernels)
            from flashinfer_local.kernels import warm_up
            warm_up()
        self.runtime_baseline_bytes = rss_bytes()
        self.bundle = Bundle(path)
        try:
            self._open(opts)
        except BaseException:
            self.close()
            raise

    def _open(self, opts: EngineOptions) -> None:
        cfg = self.config = self.bundle.config
        self.context = min(opts.context, cfg.max_position)
        self.tokenizer = self._shared_tokenizer or Tokenizer(self.bundle)
        draft_path, draft_bytes = self._draft_bytes(opts)
        sizes, sel_bytes = Sizes.of(self.bundle, self.tokenizer.lean), selector_bytes(opts.selector, self.bundle, opts.predictor)
        self.plan = plan_budget(sizes, opts.dram_budget, self.context, opts.offload, sel_bytes, opts.evict, draft_bytes)
        self.placement = None
        if self.plan.mode == "window" and (stored := stored_placement(self.bundle, opts)) is not None:
            self.plan = plan_budget(sizes, opts.dram_budget, self.context, "window", sel_bytes, opts.evict,
                                    draft_bytes, placed_budget(self.bundle, stored))
            self.placement = (stored[0], stored[2])
        self.offload, self.dram_budget = self.plan.mode, opts.dram_budget
        if opts.draft == "self" and self.offload != "window":
            why = "the self draft computes with the FFN neurons the window holds, and this engine runs with "
            raise FlashinferError(why + f"offload={self.offload!r}; use offload='window', draft='lookup' or a draft model",
                                  cli=why + f"--offload {self.offload}; use --offload window, --draft lookup or a "
                                  "draft model")
        # longest cache a session may hold: the planned context (--context), in every mode, so what
        # the plan counted is what a prompt may use
        self.kv_limit = self.context
        if draft_path is not None:
            self._open_draft_model(draft_path, opts)
        self.weights = _dense_weights(self.bundle)
        # a gate-split bundle: the gate values are computed here, once per layer, for the selector
        # and the backend (None: the records hold the gate)
        self.gates = ([self.weights[n] for n in fmt.gate_names(cfg)] if self.bundle.gate_split else None)
        self.selector = make_selector(opts.selector, self.bundle, opts.sparsity, opts.predictor, opts.layer_shares)
        self.ffn = make_backend(self.bundle, self.plan, opts, self.placement)
        self._observers: list = []
        self._selection_s = 0.0
        self.model = build_model(cfg, self.weights, self._ffn_step)

    # ---------------------------------------------------------------- a speculative draft
    def _draft_bytes(self, opts: EngineOptions) -> tuple[Path | None, int]:
        """(the draft model's bundle path or None, the bytes the draft holds in the budget)."""
        if opts.draft in (None, "lookup"):
            return None, 0
        if opts.draft == "self":                   # its own KV cache; the weights are the target's
            return None, kv_cache_bytes(self.config, self.context, kv_itemsize(self.bundle.ffn_dtype))
        path = Path(opts.draft)
        if not (path / fmt.MANIFEST).exists():
            raise FlashinferError(f"draft {opts.draft!r} is not lookup, self or a bundle directory; convert a "
                                  "draft checkpoint first (flashinfer-local convert), or pass lookup or self")
        from flashinfer_local.runtime.speculative import check_same_tokenizer
        with contextlib.closing(Bundle(path)) as b:          # refused before any plan or load
            check_same_tokenizer(self.config, self.tokenizer, b.config, Tokenizer(b), path)
            return path, draft_model_bytes(b, self.context)

    def _open_draft_model(self, path: Path, opts: EngineOptions) -> None:
        """Open the draft model all in DRAM (its tokenizer was checked by ``_draft_bytes``)."""
        self.draft_engine = Engine(path, offload="none", context=self.context, threads=opts.threads,
                                   tokenizer=self.tokenizer)               # one tokenizer in memory

    def new_draft(self):
        """A fresh draft for one session (None: this engine does not speculate)."""
        from flashinfer_local.runtime.session import Session
        from flashinfer_local.runtime.speculative import LookupDraft, SessionDraft
        d = self.options.draft
        if d is None:
            return None
        if d == "lookup":
            return LookupDraft()
        if d == "self":
            return SessionDraft("self", Session(self, forward=self.draft_forward))
        return SessionDraft(self.draft_engine.bundle.path.name, self.draft_engine.session())

    @torch.inference_mode()
    def draft_forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """``forward`` with each FFN restricted to the neurons the window holds: reads nothing and
        leaves the window as it is (the self draft)."""
        with self.ffn.resident_only():
            return self._chunked(tokens, pos, cache, last_only)

    # ---------------------------------------------------------------- the per-token path
    def _ffn_step(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """HOT: one layer's FFN for x [T, d]: the selector's per-token mask, then the backend (a
        gate-split bundle: the gate values first, which both take)."""
        t0 = time.perf_counter()
        gate = None if self.gates is None else linear(x, self.gates[layer])   # [T, d_ff] f32
        mask = self.selector.mask(layer, x, gate)              # [T, d_ff] bool, or None: all
        self._selection_s += time.perf_counter() - t0
        for fn in self._observers:
            fn(layer, x, mask)
        return self.ffn(layer, x, mask, gate)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """tokens [T] at positions [pos, pos + T) -> logits [1 or T, vocab]; writes their keys and
        values into ``cache``. A prompt longer than PREFILL_TOKENS runs in near-equal chunks (each
        above SMALL_T tokens, so each is a prefill), which bounds its activations to what the plan's
        slack counts (``budget.prefill_scratch_bytes``)."""
        self.ffn.start_token()
        return self._chunked(tokens, pos, cache, last_only)

    def _chunked(self, tokens: torch.Tensor, pos: int, cache: KVCache, last_only: bool) -> torch.Tensor:
        T = tokens.shape[0]
        if T <= PREFILL_TOKENS:
            return self.model.forward(tokens, pos, cache, last_only)
        n = -(-T // PREFILL_TOKENS)
        cuts = [T * i // n for i in range(n + 1)]
        out = [self.model.forward(tokens[a:b], pos + a, cache, last_only) for a, b in zip(cuts, cuts[1:])]
        return out[-1] if last_only else torch.cat(out)

    # ---------------------------------------------------------------- hooks for measurement
    @contextlib.contextmanager
    def observe(self, fn):
        """Within the block, ``fn(layer, x, mask)`` sees every FFN input x [T, d] (f32, normalized)
        and the mask the selector chose for it, before the backend computes the layer (calibrate
        records activations through it, eval counts kept neurons)."""
        self._observers.append(fn)
        try:
            yield
        finally:
            self._observers.remove(fn)

    @contextlib.contextmanager
    def selecting(self, selector):
        """Within the block, ``selector`` (None: every neuron) chooses each token's neurons."""
        saved, self.selector = self.selector, selector if selector is not None else AllSelector()
        try:
            yield
        finally:
            self.selector = saved

    # ---------------------------------------------------------------- caches and prompts
    def new_cache(self, capacity: int) -> KVCache:
        if capacity > self.kv_limit:
            what = (f"planned context of {self.kv_limit}" if self.kv_limit < self.config.max_position
                    else f"model's context of {self.kv_limit}")
            longer = self.kv_limit < self.config.max_position
            raise FlashinferError(
                f"the prompt and the tokens to generate ({capacity}) exceed the {what}; shorten the prompt "
                "or generate fewer tokens" + (", or open the engine with a longer context" if longer else ""),
                cli=f"prompt + --max-tokens = {capacity} tokens exceeds the {what}; shorten the prompt or "
                    "lower --max-tokens" + (", or raise --context" if longer else ""))
        return KVCache(self.config, capacity, kv_itemsize(self.bundle.ffn_dtype))

    def session(self, capacity: int | None = None):
        """A :class:`~flashinfer_local.runtime.session.Session`: a KV cache kept across calls (and,
        with a draft, the draft's state)."""
        from flashinfer_local.runtime.session import Session
        return Session(self, capacity)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of one forward over ``ids`` from an empty cache."""
        return self.forward(torch.tensor(ids), 0, self.new_cache(len(ids)), last_only=False)

    def encode_prompt(self, prompt: str | list, chat: bool = False) -> list[int]:
        """Text (``chat``: as one user message), a list of chat messages ({"role", "content"}; the
        template is applied), or token ids -> token ids."""
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt)
        return [int(t) for t in prompt]

    # ---------------------------------------------------------------- what it holds and did
    def resident_arrays(self) -> dict[str, list]:
        """Every array the FFN backend owns, by owner (``backend.BACKEND_OWNERS``)."""
        return self.ffn.resident()

    def resident(self) -> dict:
        """Bytes held per owner: the backend's and the selector's counted from their arrays, the
        dense part and the tokenizer as planned (a map's pages load on use)."""
        arrays = self.resident_arrays()
        return {"dense_bytes": self.plan.dense_bytes, "tokenizer_bytes": self.plan.tokenizer_bytes,
                "ffn_dram_bytes": array_bytes(arrays.get("ffn_dram", [])),
                "window_cache_bytes": array_bytes(arrays.get("window", [])),
                "buffer_bytes": array_bytes(arrays.get("buffers", [])), "selector_bytes": self.selector.nbytes,
                "draft_bytes": self.plan.draft_bytes}

    def counters(self) -> FFNCounters:
        return replace(self.ffn.counters(), selection_s=self._selection_s)

    def memory_facts(self) -> dict:
        """What the engine holds for the model (fixed once it is open): mode, budget, runtime
        baseline, bytes by owner, the selector and the window's rows per layer."""
        facts = {"offload": self.offload, "dram_budget_bytes": self.dram_budget,
                 "runtime_baseline_bytes": self.runtime_baseline_bytes, **self.resident(),
                 "selector": self.selector.name, "cache_rows_per_layer": self.plan.cache_rows_per_layer}
        if self.placement is not None:
            tiers, meta = self.placement
            facts["placement"] = {"solver": meta.get("solver"), "device": meta.get("device"),
                                  "pinned_neurons": int(sum(self.plan.pinned_per_layer)),
                                  "device_neurons": int(sum((t == DEVICE).sum() for t in tiers)),
                                  "device_bytes": self.ffn.device_bytes() if isinstance(self.ffn, placed.PlacedFFN) else 0,
                                  "predicted_tokens_per_s": meta.get("predicted_tokens_per_s")}
        return facts

    @staticmethod
    def io_stats(since: FFNCounters, now: FFNCounters, decode_steps: int) -> dict:
        """SSD reads, cache hits and time per decode token between ``since`` (after the prefill)
        and ``now``."""
        n = max(decode_steps, 1)
        d = now - since
        return {"flash_bytes_read": now.flash_bytes_read, "read_ops": now.read_ops,
                "mean_read_bytes": now.flash_bytes_read / now.read_ops if now.read_ops else 0,
                "flash_bytes_per_token": d.flash_bytes_read / n, "read_ops_per_token": d.read_ops / n,
                "decode_mean_read_bytes": d.flash_bytes_read / d.read_ops if d.read_ops else 0,
                "gap_bytes_per_token": d.gap_bytes_read / n,     # part of the above read through gaps
                "cache_hit_rate": d.hits / d.lookups if d.lookups else 0.0,
                "ms_per_token": {"io_wait": 1000 * d.io_wait_s / n, "bookkeeping": 1000 * d.bookkeeping_s / n,
                                 "compute": 1000 * d.compute_s / n, "selection": 1000 * d.selection_s / n}}

    # ---------------------------------------------------------------- generation
    def generate(self, prompt: str | list, max_tokens: int = 128, sampling=None, chat: bool = False,
                 stop_at_eos: bool = True, stop: list[str] | tuple = (), logprobs: bool = False,
                 speculate: bool = True) -> Iterator:
        """Yield generated tokens one by one (each a :class:`~flashinfer_local.runtime.sampling.Step`
        with its text and live stats), from a fresh session sized for this call (see
        ``Session.generate``)."""
        ids = self.encode_prompt(prompt, chat)
        s = self.session(len(ids) + max(max_tokens, 0))
        return s.generate(ids, max_tokens=max_tokens, sampling=sampling, stop_at_eos=stop_at_eos, stop=stop,
                          logprobs=logprobs, speculate=speculate)

    def close(self) -> None:
        if self.draft_engine is not None:
            self.draft_engine.close()
        if hasattr(self, "ffn"):
            self.ffn.close()
        self.bundle.close()
