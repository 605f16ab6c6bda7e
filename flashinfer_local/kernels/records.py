"""Hot path: the FFN of gathered neuron records for up to SMALL_T tokens (numba, parallel over the
selected records, GIL released); the quantized matrices' product is ``kernels.matrix``.

HOT: called once per layer (and per quantized matrix) per decode token or verification pass. No
I/O; the only scratch (activations, per-block accumulators, the int8 copy of x) is preallocated by
:class:`RecordKernel` and :class:`QuantMatrix`.

A record holds a neuron's fields in the bundle's layout (``storage.format``): for gated models gate
row, up row, down column; for OPT up row, down column, up bias. The kernel computes each selected
neuron's activation act(gate . x) * (up . x) per token (silu or tanh-gelu; ReLU models relu(up . x + b)), then adds activation * down into one
accumulator per block of BLOCK neurons, each block in ascending neuron order, and sums the blocks in
order: what a token gets depends only on x and its neurons, never on which records were resident,
how a streamed layer was split into reads, the thread count, or which other tokens shared the pass
(speculative verification relies on that: several tokens computed together equal each computed
alone).

What makes these loops fast, each measured on a Qwen-1.5B-sized layer:
- the dot products and the quantized axpy are LLVM vector code (``vecdot``): int8/int4 codes are
  dotted with an int8 copy of x (``quantize_x``) by integer multiply-adds, four <8 x float>
  accumulators stay in registers, and lanes are summed once per vector;
- offsets into a record are unsigned (``U``): with signed runtime offsets numba must wrap negative
  indices, which keeps LLVM from vectorizing the plain loops (6-9x slower);
- accumulator rows are indexed in place (``acc[t, j]``), never taken as a view per record: a view
  touches the array's reference count, shared by all threads (several times slower);
- f16 values are converted by LLVM's half-to-float conversion (``vecdot.f16``: vcvtph2ps with F16C), since
  numba has no float16 type on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .vecdot import (axpy_q4 as _axpy_q4, axpy_q5 as _axpy_q5, axpy_q8 as _axpy_q8, dot_f16, f16 as _f16,
                     prefetch_row, qdot_q4, qdot_q5, qdot_q8)

U = np.uint64     # record offsets are cast to unsigned: see the module docstring
AHEAD = 2         # the record this many ahead is prefetched (measured: 7% faster than none)
SMALL_T = 16      # up to this many tokens a forward computes each token exactly as decode does
BLOCK = 256       # neurons per block of the FFN's down accumulation (the order of its sums)
GATE_GIVEN = -2   # gate offset of a gate-split layout: the gate values come with x (``begin``)


def _f32(v):
    """A record element as float32: f16 bits are converted, f32 values pass through."""


@overload(_f32, inline="always")
def _f32_impl(v):
    if v == types.uint16:
        return lambda v: _f16(v)
    return lambda v: np.float32(v)


SILU, GELU_TANH = 0, 1   # the gate activation (``act``) of a gated model: SwiGLU, GeGLU
ACT_CODES = {"silu": SILU, "gelu_tanh": GELU_TANH, "relu": SILU}


@njit(inline="always", fastmath=True)
def _glu(g, u, act):
    # act(g) * u: silu, or gelu with the tanh approximation (torch's approximate="tanh")
    if act == GELU_TANH:
        c = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
        return np.float32(0.5) * g * (np.float32(1) + np.tanh(c)) * u
    return g / (np.float32(1) + np.exp(-g)) * u


def _dot(rec, r, off, x, t, d):
    """rec[r, off:off + d] (f16 bits or f32) . x[t] (x [T, d])."""


@overload(_dot, fastmath=True)
def _dot_impl(rec, r, off, x, t, d):
    if rec.dtype == types.uint16:
        def f16(rec, r, off, x, t, d):      # vectorized over the first multiple of 32, then the tail
            n32 = d - d % 32
            tail = np.float32(0)
            for j in range(n32, d):
                tail += _f16(rec[r, off + U(j)]) * x[t, j]
            return dot_f16(rec, r, U(2) * off, x, U(t), U(n32)) + tail
        return f16

    def f32(rec, r, off, x, t, d):          # f32 bundles: a plain loop, which LLVM vectorizes
        tot = np.float32(0)
        for j in range(d):
            tot = tot + rec[r, off + U(j)] * x[t, j]
        return tot
    return f32


@njit(inline="always", fastmath=True)
def _axpy(acc, t, hv, rec, r, off, d):
    # acc[t, :d] += hv * rec[r, off:off + d] (indexed in place: see vecdot._axpy_codegen)
    for j in range(d):
        acc[t, j] += hv * _f32(rec[r, off + U(j)])


@njit(fastmath=True, cache=True, nogil=True)
def quantize_x(x, xq, xd, xs):
    """x [32 ng] f32 -> int8 codes xq [32 ng] with a scale per 32 values xd [ng] (round to nearest,
    max |x| -> 127), and the float sums of x per group xs [ng] (for q4 minimums)."""
    for g in range(xd.shape[0]):
        amax, tot = np.float32(0), np.float32(0)
        for j in range(32):
            v = x[32 * g + j]
            amax = max(amax, abs(v))
            tot += v
        d = amax / np.float32(127)
        inv = np.float32(1) / d if d > 0 else np.float32(0)
        xd[g], xs[g] = d, tot
        for j in range(32):
            xq[32 * g + j] = np.int8(np.rint(x[32 * g + j] * inv))


@njit(inline="always")
def _wanted(sel, t, k):
    # whether token t needs record k (sel [0, 0]: every token needs every record)
    return sel.shape[0] == 0 or sel[t, k]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _act_float(rec, rows, ids, x, sel, gate, up, bias, d, gv, act, h):
    # h[t, ids[k]] = activation of record rows[k] of rec for each token t that wants it; rec [n, R]
    # f16 bits (uint16) or f32, gate/up/bias element offsets in a record (gate -1: a ReLU model's
    # record; GATE_GIVEN: the gate values are gv [T, d_ff]), x [T, d]
    m, T = rows.shape[0], x.shape[0]
    for k in prange(m):
        if k + AHEAD < m:
            prefetch_row(rec, U(rows[k + AHEAD]), U(rec.shape[1] * rec.itemsize))
        r = U(rows[k])
        for t in range(T):
            if not _wanted(sel, t, k):
                continue
            u = _dot(rec, r, U(up), x, t, d)
            if gate == -1:
                u += _f32(rec[r, U(bias)])
                h[t, ids[k]] = u if u > 0 else np.float32(0)
            elif gate == GATE_GIVEN:
                h[t, ids[k]] = _glu(gv[t, ids[k]], u, act)
            else:
                h[t, ids[k]] = _glu(_dot(rec, r, U(gate), x, t, d), u, act)


@njit(inline="always", fastmath=True)
def _qdot_code(p, q, s16, r, off, so, mo, ho, xq, xd, xs, t, ng):
    # one stored vector of record r dotted with token t's x: q8 (mo < 0), q4 (ho < 0) or q5
    if mo < 0:
        return qdot_q8(q, s16, r, U(off), U(so), xq, xd, U(t), ng)
    if ho < 0:
        return qdot_q4(p, s16, r, U(off), U(so), U(mo), xq, xd, xs, U(t), ng)
    return qdot_q5(p, s16, r, U(off), U(so), U(mo), U(ho), xq, xd, xs, U(t), ng)


@njit(inline="always", fastmath=True)
def _act_quant(p, q, s16, f32, r, xq, xd, xs, t, gq, uq, gs, us, gm, um, gh, uh, bias, ng, gv, n, act):
    # one neuron's (n, record r) activation for token t from quantized gate/up rows (offsets:
    # codes, scales, minimums, fifth bits; see _qdot_code; gq -1: a ReLU model; GATE_GIVEN: gv)
    u = _qdot_code(p, q, s16, r, uq, us, um, uh, xq, xd, xs, t, ng)
    if gq == -1:
        u += f32[r, U(bias)]
        return u if u > 0 else np.float32(0)
    if gq == GATE_GIVEN:
        return _glu(gv[t, n], u, act)
    return _glu(_qdot_code(p, q, s16, r, gq, gs, gm, gh, xq, xd, xs, t, ng), u, act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _act_quant_rows(p, q, s16, f32, rows, ids, sel, T, xq, xd, xs, gq, uq, gs, us, gm, um, gh, uh, bias, ng, gv,
                    act, h):
    # h[t, ids[k]] = activation of record rows[k] for each token t < T that wants it. p [n, R] uint8,
    # q int8, s16 uint16, f32: views of the same records; code offsets in bytes, scale/minimum offsets
    # in u16 elements (minimum -1: that vector is q8), fifth bits in bytes (-1: not q5), bias in f32
    # elements (-1: gated); x as int8
    # (xq, xd [T, ...]) and its group sums xs
    m = rows.shape[0]
    for k in prange(m):
        if k + AHEAD < m:
            prefetch_row(p, U(rows[k + AHEAD]), U(p.shape[1]))
        r = U(rows[k])
        for t in range(T):
            if _wanted(sel, t, k):
                h[t, ids[k]] = _act_quant(p, q, s16, f32, r, xq, xd, xs, t, gq, uq, gs, us, gm, um, gh, uh, bias,
                                          ng, gv, ids[k], act)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _down_float(ra, rb, rows, ids, starts, h, T, down, d, nb, part):
    # part[t * nb + block] += h[t, n] * down column of record n, block by block (``starts``: where
    # each block's run of ``ids`` begins), each block's records in id order; rows[k] >= 0: a row
    # of ra, else row -rows[k] - 1 of rb
    for g in prange(starts.shape[0] - 1):
        a, b = starts[g], starts[g + 1]
        blk = ids[a] // BLOCK
        for k in range(a, b):
            rk = rows[k]
            for t in range(T):
                hv = h[t, ids[k]]
                if hv == 0:
                    continue
                if rk >= 0:
                    _axpy(part, t * nb + blk, hv, ra, U(rk), U(down), d)
                else:
                    _axpy(part, t * nb + blk, hv, rb, U(-rk - 1), U(down), d)


@njit(inline="always")
def _axpy_code(part, row, hv, p, q, s16, r, dq, ds, dm, dh, ng):
    # part[row] += hv * the down column of record r: q8 (dm < 0), q4 (dh < 0) or q5
    if dm < 0:
        _axpy_q8(part, row, hv, q, s16, r, U(dq), U(ds), ng)
    elif dh < 0:
        _axpy_q4(part, row, hv, p, s16, r, U(dq), U(ds), U(dm), ng)
    else:
        _axpy_q5(part, row, hv, p, s16, r, U(dq), U(ds), U(dm), U(dh), ng)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _down_quant(pa, qa, sa, pb, qb, sb, rows, ids, starts, h, T, dq, ds, dm, dh, ng, nb, part):
    # _down_float for q8, q4 or q5 down columns (``_axpy_code``): records as uint8 / int8 / uint16 views
    for g in prange(starts.shape[0] - 1):
        a, b = starts[g], starts[g + 1]
        blk = ids[a] // BLOCK
        for k in range(a, b):
            rk = rows[k]
            for t in range(T):
                hv = h[t, ids[k]]
                if hv == 0:
                    continue
                if rk >= 0:
                    _axpy_code(part, t * nb + blk, hv, pa, qa, sa, U(rk), dq, ds, dm, dh, ng)
                else:
                    _axpy_code(part, t * nb + blk, hv, pb, qb, sb, U(-rk - 1), dq, ds, dm, dh, ng)


@njit(cache=True, nogil=True)
def _sum_blocks(part, T, nb, out):
    # out[t] += part[t * nb + b] for b in order (no fastmath: the order is the point)
    for t in range(T):
        for b in range(nb):
            for j in range(out.shape[1]):
                out[t, j] += part[t * nb + b, j]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _dequantize_field(p, q, s16, off, so, mo, ho, ng, out):
    # out [c, 32 ng] f32 = one quantized vector of each record (q8 where mo < 0, else q4, or q5
    # where its fifth bits start at byte ho >= 0): the prefill's f32 matrices, built at memory
    # speed rather than through numpy temporaries
    for r in prange(p.shape[0]):
        for g in range(ng):
            sg = _f16(s16[r, U(so) + U(g)])
            if mo >= 0:
                mg = _f16(s16[r, U(mo) + U(g)])
                for j in range(16):
                    v = p[r, U(off) + U(16 * g + j)]
                    lo, hi = np.float32(v & np.uint8(15)), np.float32(v >> np.uint8(4))
                    if ho >= 0:
                        bits = p[r, U(ho) + U(4 * g + j // 8)]
                        lo += np.float32(16 * ((bits >> np.uint8(j % 8)) & np.uint8(1)))
                        bits = p[r, U(ho) + U(4 * g + 2 + j // 8)]
                        hi += np.float32(16 * ((bits >> np.uint8(j % 8)) & np.uint8(1)))
                    out[r, 32 * g + j] = lo * sg + mg
                    out[r, 32 * g + 16 + j] = hi * sg + mg
            else:
                for j in range(32):
                    out[r, 32 * g + j] = np.float32(q[r, U(off) + U(32 * g + j)]) * sg


def quantize_rows(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """quantize_x of each row of x [T, 32 ng] into rows of xq, xd, xs."""
    for t in range(x.shape[0]):
        quantize_x(x[t], xq[t], xd[t], xs[t])


def block_starts(ids: np.ndarray) -> np.ndarray:
    """Where each BLOCK of neuron ids begins in ``ids`` (ascending), and len(ids) at the end."""
    blk = ids // BLOCK
    return np.concatenate([[0], np.flatnonzero(blk[1:] != blk[:-1]) + 1, [len(ids)]]).astype(np.int64)


class RecordKernel:
    """The FFN over one bundle's records for up to SMALL_T tokens, in an order that does not depend
    on where the records sit or how they are split into calls: a token's output is a function of x
    and the set of neurons it computes, so decode, a streamed decode and a speculative verification
    of several tokens agree bit for bit.

    A layer is ``begin(x)``, then any number of ``activations`` (gate/up: one value per neuron and
    token, into h) and ``down`` calls (each neuron's down column scaled by its activation, into
    per-block accumulators of BLOCK neurons, each block's records in ascending id order), then
    ``finish(out)``, which adds the blocks in order. A block's records may come in several ``down``
    calls as long as the calls go in ascending id order.
    """

    def __init__(self, layout, dtype: str, d_model: int, d_ff: int, activation: str = "silu"):
        self.d, self.dtype, self.T = d_model, dtype, 0
        self.act = ACT_CODES[activation]
        self.nb = -(-d_ff // BLOCK)
        self.h = np.zeros((SMALL_T, d_ff), np.float32)                   # activations per token
        self.part = np.zeros((SMALL_T * self.nb, d_model), np.float32)     # per token and block
        self.split = layout.gate_split
        self.gv = np.zeros((SMALL_T, d_ff) if self.split else (0, 0), np.float32)   # given gate values
        f = {x.name: x for x in layout.fields}
        if dtype in ("f16", "f32"):
            item = 2 if dtype == "f16" else 4
            off = {x.name: x.offset // item for x in layout.fields}
            self.gate, self.up, self.down_off = off.get("gate", GATE_GIVEN if self.split else -1), off["up"], off["down"]
            self.bias = off.get("up_bias", -1)
            self.x = np.zeros((SMALL_T, d_model), np.float32)
        else:
            # codes: byte offsets; scales/minimums: u16 offsets; the OPT up bias: f32 offset
            self.bias = f["up_bias"].offset // 4 if "up_bias" in f else -1
            self.q = {v: f[v].offset if v in f else -1 for v in ("gate", "up", "down")}
            if self.split:
                self.q["gate"] = GATE_GIVEN
            self.s = {v: f[v + ".scale"].offset // 2 if v + ".scale" in f else -1 for v in ("gate", "up", "down")}
            self.m = {v: f[v + ".min"].offset // 2 if v + ".min" in f else -1 for v in ("gate", "up", "down")}
            # q5: the byte where a vector's fifth bits start (after its low nibbles)
            self.hb = {v: f[v].offset + d_model // 2 if v in f and f[v].dtype == "q5" else -1
                       for v in ("gate", "up", "down")}
            self.xq = np.zeros((SMALL_T, d_model), np.int8)                # x as int8 codes, scales, sums
            self.xd = np.zeros((SMALL_T, d_model // 32), np.float32)
            self.xs = np.zeros((SMALL_T, d_model // 32), np.float32)
        self.all_sel = np.zeros((0, 0), np.bool_)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.scratch_arrays())

    def scratch_arrays(self) -> list:
        names = ("h", "part", "x") if self.dtype in ("f16", "f32") else ("h", "part", "xq", "xd", "xs")
        return [getattr(self, n) for n in names] + [self.gv]

    @staticmethod
    def scratch_bytes(layout, dtype: str, d_model: int, d_ff: int) -> int:
        nb = -(-d_ff // BLOCK)
        x = 4 * d_model if dtype in ("f16", "f32") else d_model + 8 * (d_model // 32)
        return SMALL_T * (4 * d_ff * (2 if layout.gate_split else 1) + 4 * nb * d_model + x)

    def begin(self, x: np.ndarray, gate: np.ndarray | None = None) -> None:
        """Start a layer for x [T, d] f32 (T <= SMALL_T): no activations, empty blocks. A
        gate-split layout takes each neuron's gate value with x: ``gate`` [T, d_ff] f32."""
        T = self.T = x.shape[0]
        if self.split:
            if gate is None:
                raise ValueError("a gate-split layout's kernel needs the gate values (begin(x, gate))")
            self.gv[:T] = gate
        self.h[:T] = 0
        self.part[:T * self.nb] = 0
        if self.dtype in ("f16", "f32"):
            self.x[:T] = x
        else:
            quantize_rows(x, self.xq, self.xd, self.xs)

    def activations(self, recs: np.ndarray, rows: np.ndarray, ids: np.ndarray, sel: np.ndarray | None = None,
                    h: np.ndarray | None = None) -> None:
        """h[t, ids[k]] = the activation of record ``recs[rows[k]]`` (neuron ids[k]) for each token t
        with sel[t, k] (sel None: every token); recs [n, record_bytes] uint8, possibly ending before
        the down column. ``h`` defaults to the kernel's own [SMALL_T, d_ff]."""
        if len(rows) == 0:
            return
        h = self.h if h is None else h
        sel = self.all_sel if sel is None else sel
        if self.dtype in ("f16", "f32"):
            _act_float(recs.view(np.uint16 if self.dtype == "f16" else np.float32), rows, ids, self.x[:self.T], sel,
                       self.gate, self.up, self.bias, self.d, self.gv, self.act, h)
            return
        q, s, m = self.q, self.s, self.m
        _act_quant_rows(recs, recs.view(np.int8), recs.view(np.uint16), recs.view(np.float32), rows, ids, sel,
                        self.T, self.xq, self.xd, self.xs, q["gate"], q["up"], s["gate"], s["up"], m["gate"],
                        m["up"], self.hb["gate"], self.hb["up"], self.bias, self.d // 32, self.gv, self.act, h)

    def down(self, ra: np.ndarray, rows: np.ndarray, ids: np.ndarray, rb: np.ndarray | None = None) -> None:
        """Add each record's down column times its activations: record k is ``ra[rows[k]]``, or
        ``rb[-rows[k] - 1]`` where rows[k] < 0; ids ascending, and above every id of earlier calls
        in the same block."""
        if len(rows) == 0:
            return
        rb = ra[:0] if rb is None else rb
        starts = block_starts(ids)
        if self.dtype in ("f16", "f32"):
            v = np.uint16 if self.dtype == "f16" else np.float32
            _down_float(ra.view(v), rb.view(v), rows, ids, starts, self.h, self.T, self.down_off, self.d,
                        self.nb, self.part)
            return
        _down_quant(ra, ra.view(np.int8), ra.view(np.uint16), rb, rb.view(np.int8), rb.view(np.uint16), rows, ids,
                    starts, self.h, self.T, self.q["down"], self.s["down"], self.m["down"], self.hb["down"],
                    self.d // 32, self.nb, self.part)

    def finish(self, out: np.ndarray) -> None:
        """out [T, d] += the layer's blocks, in order."""
        _sum_blocks(self.part, self.T, self.nb, out)

    def __call__(self, recs: np.ndarray, rows: np.ndarray, x: np.ndarray, out: np.ndarray,
                 gate: np.ndarray | None = None) -> None:
        """out [d] += FFN over records ``recs[rows]`` (rows ascending: neuron ids), x [d] f32
        (gate-split: ``gate`` [d_ff], the gate values)."""
        if len(rows) == 0:
            return
        rows = np.sort(np.asarray(rows, np.int64))
        self.begin(x[None], None if gate is None else gate[None])
        self.activations(recs, rows, rows)
        self.down(recs, rows, rows)
        self.finish(out[None])

    def dequantize(self, part: np.ndarray, name: str, out: np.ndarray) -> np.ndarray:
        """Vector ``name`` (gate/up/down) of quantized records part [c, record_bytes] as f32 into
        out [>= c, d]; returns out[:c]."""
        c = part.shape[0]
        _dequantize_field(part, part.view(np.int8), part.view(np.uint16), self.q[name], self.s[name],
                          self.m[name], self.hb[name], self.d // 32, out[:c])
        return out[:c]


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel variant on tiny inputs, so JIT
    memory and time land in the runtime baseline rather than in the first token."""
    from .matrix import QuantMatrix
    from storage.config import ModelConfig
    from storage.format import record_layout
    for gated in (True, False):
        cfg = ModelConfig(arch="llama" if gated else "opt", n_layers=1, d_model=32, d_ff=2, n_heads=1,
                          n_kv_heads=(1,), head_dim=32, vocab_size=2, max_position=8, norm_eps=1e-5,
                          activation="silu" if gated else "relu")
        for dtype, down, gate_up in (("f16", None, None), ("f32", None, None), ("int8", None, None),
                                     ("int4", "q8", "q5"), ("int4", "q5", "q4"), ("int4", "q4", "q4")):
            lay = record_layout(cfg, dtype, down, gate_up)
            k = RecordKernel(lay, dtype, 32, 2)
            recs = np.zeros((2, lay.record_bytes), np.uint8)
            k(recs, np.arange(2), np.ones(32, np.float32), np.zeros(32, np.float32))
            k.begin(np.ones((2, 32), np.float32))
            k.activations(recs, np.arange(2), np.arange(2), np.ones((2, 2), np.bool_))
            k.down(recs, np.array([0, -1]), np.arange(2), recs)
            if dtype not in ("f16", "f32"):      # a prefill's f32 fields
                for name in ("gate", "up", "down") if gated else ("up", "down"):
                    k.dequantize(recs, name, np.empty((2, 32), np.float32))
    for m in (QuantMatrix(np.zeros((2, 32), np.int8), np.zeros((2, 1), np.float16)),
              QuantMatrix(np.zeros((2, 16), np.uint8), np.zeros((2, 2), np.float16)),
              QuantMatrix(np.zeros((2, 20), np.uint8), np.zeros((2, 2), np.float16))):
        for T in (1, 2, SMALL_T + 1):
            m.matmul(torch.ones(T, 32))
        m.rows(torch.zeros(1, dtype=torch.long))
