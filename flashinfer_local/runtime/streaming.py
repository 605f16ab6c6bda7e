"""FFN records streamed from the SSD: the "LLM in a Flash" mechanism on this project's bundle.

``StreamingFFN`` is an FFN backend (``backend.FFNBackend``) that, per layer and forward pass:
1. takes the neurons the engine's selector kept (the union over the pass's tokens; a token
   computes only its own);
2. window mode: plans the layer's window cache (bookkeeping time) and submits direct reads of the
   records not yet resident into the rows the plan appended;
3. computes the resident part while those reads are in flight (overlap), waits (I/O wait time),
   computes the new part, then streams any overflow (a selection larger than the cache) through two
   scratch buffers, reading the next chunk while computing the current one.
Up to SMALL_T tokens (decode, a speculative verification: one read of a neuron serves all of them)
step 3 computes the activations as records become available and the down pass in neuron order
(``kernels.RecordKernel``), so each token's values do not depend on what the window held; a
prefill computes each part by BLAS as it arrives. ``resident_only`` (the self draft) computes
with what the window holds, reading nothing.
Naive mode has no cache: every token reads every selected record (with ``all``: the whole FFN).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from storage import format as fmt
from storage.direct_io import RecordReader, aligned_empty
from storage.reader import Bundle
from storage.window_cache import LayerWindow

from flashinfer_local.runtime.backend import FFNCounters, arrays_of
from flashinfer_local.runtime.budget import SCRATCH_BUFFERS, BudgetPlan
from flashinfer_local.kernels import SMALL_T
from flashinfer_local.runtime.dram import CHUNK_ROWS, RecordCompute, gate_array, selected_ids, token_selection

# Read through gaps of up to this many bytes of unwanted records rather than issue another request:
# on this project's reference disk (tools/bench_stream.py; 9 KiB records of Qwen-1.5B f16, 8 reader
# threads) 2-record gaps raised the useful read rate of 30-50%-dense selections by 15-40%.
MAX_GAP_BYTES = 20 << 10


class StreamingFFN:
    """Window (``plan.mode == "window"``) or naive reads of FFN records from the SSD."""

    def __init__(self, bundle: Bundle, plan: BudgetPlan, window: int, io_threads: int = 8,
                 direct: bool = True, evict: str = "recency", read_gap: int = MAX_GAP_BYTES,
                 pinned: list[np.ndarray] | None = None, prompt_pin: float = 0.0):
        # pinned: a placement's DRAM-pinned neurons per layer (sorted ids), held at the front of each
        # window and read once here (plan.rows_per_layer sizes each layer's window); prompt_pin: the
        # share of each window's other rows a prompt's most active neurons hold (``_repin``)
        cfg, lay = bundle.config, bundle.layout
        self.cfg = cfg
        self.reader = RecordReader(bundle.file_path(fmt.FFN_FILE), lay.record_bytes,
                                   [bundle.ffn_offset(i) for i in range(cfg.n_layers)],
                                   threads=io_threads, max_gap_bytes=read_gap, direct=direct)
        self.scratch = [aligned_empty((CHUNK_ROWS, lay.record_bytes)) for _ in range(SCRATCH_BUFFERS)]
        self.compute = RecordCompute(bundle)
        self.windows = []
        rows = plan.rows_per_layer or (plan.cache_rows_per_layer,) * cfg.n_layers
        if plan.mode == "window" and max(rows) > 0:
            self.windows = [LayerWindow(cfg.d_ff, lay.record_bytes, r, window,
                                        rows=aligned_empty((r, lay.record_bytes)), evict=evict,
                                        pinned=None if pinned is None else pinned[i])
                            for i, r in enumerate(rows)]
            for i, w in enumerate(self.windows):       # pinned records: one read per contiguous run
                if w.n_pinned:
                    self.reader.read(i, w.resident_ids.astype(np.int64), w.rows[:w.n_pinned])
        self.all_ids = np.arange(cfg.d_ff, dtype=np.int64)
        self.prompt_pin = prompt_pin if self.windows else 0.0
        # per layer the prompt's |activation| per neuron, summed over its prefill chunks; None: no
        # prefill since the last repin of that layer
        self.prompt_score: list[np.ndarray | None] = [None] * cfg.n_layers
        self.token = -1
        self.t = {"bookkeeping_s": 0.0, "compute_s": 0.0, "io_wait_s": 0.0}
        self.lookups = self.hits = self.moved = 0
        self.drafting = False

    # ---- what it holds and did
    def resident(self) -> dict[str, list]:
        return {"window": [a for w in self.windows for a in arrays_of(w)],
                "buffers": self.scratch + self.compute.arrays()}

    def counters(self) -> FFNCounters:
        r = self.reader
        return FFNCounters(bookkeeping_s=self.t["bookkeeping_s"], compute_s=self.t["compute_s"],
                           io_wait_s=self.t["io_wait_s"], flash_bytes_read=r.bytes_read, read_ops=r.read_ops,
                           gap_bytes_read=r.gap_bytes, lookups=self.lookups, hits=self.hits,
                           rows_moved=self.moved)

    def cache_rows(self) -> list[int]:
        return [int(w.n_used) for w in self.windows]

    def start_token(self) -> None:
        self.token += 1

    # ---- a prefill (T > SMALL_T): BLAS on each part as it becomes available
    def _compute(self, x: torch.Tensor, recs: np.ndarray, out: torch.Tensor, rows: np.ndarray | None = None,
                 mask: torch.Tensor | None = None, ids: np.ndarray | None = None,
                 gate: torch.Tensor | None = None, score: np.ndarray | None = None) -> None:
        """out += FFN of ``recs`` (or ``recs[rows]``), which hold neurons ``ids``; with a mask [T, d_ff]
        each token computes only its own selection (its columns ``ids``); ``gate`` [T, d_ff]: the
        gate values of a gate-split layout; ``score`` [d_ff]: += the prompt's |activation| of ``ids``."""
        t0 = time.perf_counter()
        cols = torch.from_numpy(ids)
        part = None if score is None else np.zeros(len(ids), np.float32)
        self.compute(x, recs, out, rows, None if mask is None else mask[:, cols], None if gate is None else gate[:, cols],
                     part)
        if score is not None:
            score[ids] += part
        self.t["compute_s"] += time.perf_counter() - t0

    def _wait(self, batch) -> None:
        t0 = time.perf_counter()
        batch.wait()
        self.t["io_wait_s"] += time.perf_counter() - t0

    def _chunks(self, layer: int, ids: np.ndarray, win: LayerWindow | None = None):
        """Yield (chunk ids, their records in id order), CHUNK_ROWS consecutive ``ids`` at a time,
        the next chunk's reads in flight while the caller computes on the current one. With
        ``win``, the records the window holds are copied from it, only the others read."""
        chunks = [ids[a:a + CHUNK_ROWS] for a in range(0, len(ids), CHUNK_ROWS)]

        def submit(j):
            slots = None if win is None else win.slot[chunks[j]]
            miss = chunks[j] if slots is None else chunks[j][slots < 0]
            buf = self.scratch[j % 2][:len(miss)]
            return slots, buf, (self.reader.submit(layer, miss, buf) if len(miss) else None)
        pending = submit(0) if chunks else None
        for j, ch in enumerate(chunks):
            slots, recs, batch = pending
            if batch is not None:
                self._wait(batch)
            if slots is not None:
                hit = slots >= 0
                self.hits += int(hit.sum())
                part = np.empty((len(ch), win.rows.shape[1]), np.uint8)
                part[hit], part[~hit] = win.rows[slots[hit]], recs
                recs = part
            if j + 1 < len(chunks):
                pending = submit(j + 1)
            yield ch, recs

    def _prefill(self, layer: int, x: torch.Tensor, ids: np.ndarray, mask, gate) -> torch.Tensor:
        """The selected records chunk by chunk in id order, computed by BLAS in chunk order (with
        a window: its records copied, the rest read; the window left as it is): the result depends
        on the selection only, never on what the window held (a masked prefill's rounding would
        otherwise move neurons across a predictor's cutoff)."""
        out = torch.zeros(x.shape[0], self.cfg.d_model)
        score = None
        if self.prompt_pin:
            score = self.prompt_score[layer]
            if score is None:
                score = self.prompt_score[layer] = np.zeros(self.cfg.d_ff, np.float32)
        for ch, recs in self._chunks(layer, ids, self.windows[layer] if self.windows else None):
            self._compute(x, recs, out, mask=mask, ids=ch, gate=gate, score=score)
        return out

    def _repin(self, layer: int) -> None:
        """After a prompt: the layer's window keeps, pinned, the ``prompt_pin`` share of its rows
        (beyond the placement's) for the neurons the prompt activated most, read now; the rest of
        the window starts empty. Never a reason to skip a neuron: only what DRAM holds."""
        score, self.prompt_score[layer] = self.prompt_score[layer], None
        win = self.windows[layer]
        score[win.resident_ids[:win.n_base]] = 0              # the placement's own pins stay as they are
        n = min(int(self.prompt_pin * (win.capacity - win.n_base)), int((score > 0).sum()))
        ids = np.sort(np.argpartition(-score, n - 1)[:n]).astype(np.int64) if n > 0 else self.all_ids[:0]
        rows = win.repin(ids)
        if len(ids):
            t0 = time.perf_counter()
            self.reader.read(layer, ids, win.rows[rows])
            self.t["io_wait_s"] += time.perf_counter() - t0

    # ---- decode and verification (T <= SMALL_T): each token exactly as it would be alone
    def _act(self, recs: np.ndarray, rows: np.ndarray, ids: np.ndarray, mask) -> None:
        t0 = time.perf_counter()
        self.compute.kernel.activations(recs, rows, ids, token_selection(mask, ids))
        self.t["compute_s"] += time.perf_counter() - t0

    def _down(self, ra: np.ndarray, rows: np.ndarray, ids: np.ndarray, rb: np.ndarray | None = None) -> None:
        t0 = time.perf_counter()
        order = np.argsort(ids, kind="stable")
        self.compute.kernel.down(ra, rows[order], ids[order], rb)
        self.t["compute_s"] += time.perf_counter() - t0

    def _small(self, layer: int, x: torch.Tensor, ids: np.ndarray, mask, gate) -> torch.Tensor:
        """Activations of resident records while reads are in flight, then the down pass in neuron
        order: resident records merged with each streamed chunk as it arrives."""
        T = x.shape[0]
        k = self.compute.kernel
        k.begin(x.numpy(), gate_array(gate))
        res_ids = res_rows = ids[:0]
        rows_of = None
        if self.windows:
            win, plan, batch = self._plan(layer, ids)
            rows_of = win.rows
            self._act(win.rows, plan.hit_rows.astype(np.int64), plan.hit_ids, mask)
            new_rows = np.arange(plan.new_rows.start, plan.new_rows.stop, dtype=np.int64)
            if batch is not None:
                self._wait(batch)
                self._act(win.rows, new_rows, plan.new_ids, mask)
            res_ids = np.concatenate([plan.hit_ids, plan.new_ids])
            res_rows = np.concatenate([plan.hit_rows.astype(np.int64), new_rows])
            order = np.argsort(res_ids, kind="stable")          # two ascending runs: linear
            res_ids, res_rows = res_ids[order], res_rows[order]
            ids = plan.overflow_ids
        done = 0                                  # resident records already in a down pass
        for ch, recs in self._chunks(layer, ids):
            self._act(recs, np.arange(len(ch)), ch, mask)
            upto = int(np.searchsorted(res_ids, ch[-1], side="right"))
            self._down(recs if rows_of is None else rows_of,
                       np.concatenate([res_rows[done:upto], -1 - np.arange(len(ch))]),
                       np.concatenate([res_ids[done:upto], ch]), rb=recs)
            done = upto
        if done < len(res_ids):
            self._down(rows_of, res_rows[done:], res_ids[done:])
        out = self.compute.output(T)
        k.finish(out.numpy())
        return out

    def _plan(self, layer: int, ids: np.ndarray):
        """The window's plan for ``ids`` and the submitted reads of its new records."""
        win = self.windows[layer]
        t0 = time.perf_counter()
        plan = win.plan(self.token, ids)
        self.t["bookkeeping_s"] += time.perf_counter() - t0
        self.hits += len(plan.hit_ids)
        self.moved += plan.moved
        batch = None
        if len(plan.new_ids):
            batch = self.reader.submit(layer, plan.new_ids, win.rows[plan.new_rows])
        return win, plan, batch

    # ---- the self draft: only what the window holds
    @contextlib.contextmanager
    def resident_only(self):
        """Within the block each layer computes only the selected neurons its window holds: no
        reads, no change to the window, nothing counted."""
        self.drafting = True
        try:
            yield
        finally:
            self.drafting = False

    def _resident(self, layer: int, x: torch.Tensor, ids: np.ndarray, mask, gate) -> torch.Tensor:
        win = self.windows[layer] if self.windows else None
        slots = win.slot[ids] if win is not None else np.full(len(ids), -1)
        keep = slots >= 0
        ids, rows = ids[keep], slots[keep].astype(np.int64)
        if x.shape[0] > SMALL_T:
            out = torch.zeros(x.shape[0], self.cfg.d_model)
            if len(ids):
                cols = torch.from_numpy(ids)
                self.compute(x, win.rows, out, rows, None if mask is None else mask[:, cols],
                             None if gate is None else gate[:, cols])
            return out
        k = self.compute.kernel
        k.begin(x.numpy(), gate_array(gate))
        if len(ids):
            k.activations(win.rows, rows, ids, token_selection(mask, ids))
            k.down(win.rows, rows, ids)
        out = self.compute.output(x.shape[0])
        k.finish(out.numpy())
        return out

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, d] (f32) -> [T, d]; mask [T, d_ff] or None (all neurons); gate [T, d_ff]: the gate
        # values of a gate-split layout
        T = x.shape[0]
        ids = self.all_ids if mask is None else selected_ids(mask)
        if T == 1:
            mask = None                           # ids are the token's selection
        if self.drafting:
            return self._resident(layer, x, ids, mask, gate)
        self.lookups += len(ids)
        if T <= SMALL_T:
            if self.prompt_score[layer] is not None:
                self._repin(layer)
            return self._small(layer, x, ids, mask, gate)
        return self._prefill(layer, x, ids, mask, gate)

    def close(self) -> None:
        self.reader.close()
