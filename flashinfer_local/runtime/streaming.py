"""FFN records streamed from the SSD: the "LLM in a Flash" mechanism on this project's bundle.

``StreamingFFN`` is an FFN backend (``backend.FFNBackend``) that, per layer and forward pass:
1. takes the neurons the engine's selector kept (the union over the pass's tokens; a token
   computes only its own);
2. window mode: plans the layer's window cache (bookkeeping time) and submits direct reads of the
   records not yet resident into the rows the plan appended;
3. computes the resident part while those reads are in flight (overlap), waits (I/O wait time),
   computes the new part, then streams any overflow (a selection larger than the cache) through two
   scratch buffers, reading the next chunk while computing the current one.
Naive mode has no cache: every token reads every selected record (with ``all``: the whole FFN).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from storage.direct_io import RecordReader, aligned_empty
from storage.reader import Bundle
from storage.window_cache import LayerWindow

from flashinfer_local.runtime.backend import FFNCounters, arrays_of
from flashinfer_local.runtime.budget import SCRATCH_BUFFERS, BudgetPlan
from flashinfer_local.runtime.dram import CHUNK_ROWS, RecordCompute

# Read through gaps of up to this many bytes of unwanted records rather than issue another request:
# on this project's reference disk (tools/bench_stream.py; 9 KiB records of Qwen-1.5B f16, 8 reader
# threads) 2-record gaps raised the useful read rate of 30-50%-dense selections by 15-40%.
MAX_GAP_BYTES = 20 << 10


class StreamingFFN:
    """Window (``plan.mode == "window"``) or naive reads of FFN records from the SSD."""

    def __init__(self, bundle: Bundle, plan: BudgetPlan, window: int, io_threads: int = 8,
                 direct: bool = True, evict: str = "recency", read_gap: int = MAX_GAP_BYTES):
        cfg, lay = bundle.config, bundle.layout
        self.cfg = cfg
        self.reader = RecordReader(bundle.ffn_path, lay.record_bytes,
                                   [bundle.ffn_offset(i) for i in range(cfg.n_layers)],
                                   threads=io_threads, max_gap_bytes=read_gap, direct=direct)
        self.scratch = [aligned_empty((CHUNK_ROWS, lay.record_bytes)) for _ in range(SCRATCH_BUFFERS)]
        self.compute = RecordCompute(bundle)
        self.windows = []
        if plan.mode == "window" and plan.cache_rows_per_layer > 0:
            rows = plan.cache_rows_per_layer
            self.windows = [LayerWindow(cfg.d_ff, lay.record_bytes, rows, window,
                                        rows=aligned_empty((rows, lay.record_bytes)), evict=evict)
                            for _ in range(cfg.n_layers)]
        self.all_ids = np.arange(cfg.d_ff, dtype=np.int64)
        self.token = -1
        self.t = {"bookkeeping_s": 0.0, "compute_s": 0.0, "io_wait_s": 0.0}
        self.lookups = self.hits = self.moved = 0

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

    # ---- compute (records [m, record_bytes] u8 -> accumulate into out [T, d])
    def _compute(self, x: torch.Tensor, recs: np.ndarray, out: torch.Tensor, rows: np.ndarray | None = None,
                 mask: torch.Tensor | None = None, ids: np.ndarray | None = None) -> None:
        """out += FFN of ``recs`` (or ``recs[rows]``), which hold neurons ``ids``; with a mask [T, d_ff]
        each token computes only its own selection (several tokens: its columns ``ids``)."""
        t0 = time.perf_counter()
        self.compute(x, recs, out, rows, None if mask is None else mask[:, torch.from_numpy(ids)])
        self.t["compute_s"] += time.perf_counter() - t0

    def _wait(self, batch) -> None:
        t0 = time.perf_counter()
        batch.wait()
        self.t["io_wait_s"] += time.perf_counter() - t0

    def _stream(self, layer: int, x: torch.Tensor, ids: np.ndarray, out: torch.Tensor, mask) -> None:
        """Read ``ids`` in chunks through the two scratch buffers, computing one while reading the next."""
        chunks = [ids[a:a + CHUNK_ROWS] for a in range(0, len(ids), CHUNK_ROWS)]
        if not chunks:
            return
        pending = self.reader.submit(layer, chunks[0], self.scratch[0][:len(chunks[0])])
        for j, ch in enumerate(chunks):
            self._wait(pending)
            if j + 1 < len(chunks):
                nxt = chunks[j + 1]
                pending = self.reader.submit(layer, nxt, self.scratch[(j + 1) % 2][:len(nxt)])
            self._compute(x, self.scratch[j % 2][:len(ch)], out, mask=mask, ids=ch)

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, d] (f32) -> [T, d]; mask [T, d_ff] or None (all neurons)
        T = x.shape[0]
        if mask is None:
            ids = self.all_ids
        else:
            ids = np.flatnonzero((mask[0] if T == 1 else mask.any(0)).numpy())
        if T == 1:
            mask = None                           # ids are the token's selection
            out = self.compute.out.zero_()        # HOT: reused, no allocation per layer
        else:
            out = torch.zeros(T, self.cfg.d_model)
        self.lookups += len(ids)
        if not self.windows:                      # naive: everything from the SSD, nothing kept
            self._stream(layer, x, ids, out, mask)
            return out
        win = self.windows[layer]
        t0 = time.perf_counter()
        plan = win.plan(self.token, ids)
        self.t["bookkeeping_s"] += time.perf_counter() - t0
        self.hits += len(plan.hit_ids)
        self.moved += plan.moved
        batch = None
        if len(plan.new_ids):
            batch = self.reader.submit(layer, plan.new_ids, win.rows[plan.new_rows])
        if len(plan.hit_rows):                    # overlap: resident part while reads are in flight
            order = np.argsort(plan.hit_rows)
            self._compute(x, win.rows, out, plan.hit_rows[order].astype(np.int64), mask, plan.hit_ids[order])
        if batch is not None:
            self._wait(batch)
            self._compute(x, win.rows[plan.new_rows], out, mask=mask, ids=plan.new_ids)
        self._stream(layer, x, plan.overflow_ids, out, mask)
        return out

    def close(self) -> None:
        self.reader.close()
