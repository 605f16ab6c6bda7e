"""Hot path: the FFN of gathered neuron records for one token, and the int8 matrix-vector product
(numba, parallel over the selected records / rows, GIL released).

HOT: called once per layer (and per quantized matrix) per decode token. No I/O; the only scratch
(per-thread accumulators, the int8 copy of x) is preallocated by :class:`RecordKernel` and
:class:`QuantMatrix`.

A record holds a neuron's fields in the bundle's layout (``storage.format``): for gated models gate
row, up row, down column; for OPT up row, down column, up bias. The kernel reads each selected
record once: out[d] += act(gate . x, up . x) * down, each thread into its own accumulator.

What makes these loops fast, each measured on a Qwen-1.5B-sized layer:
- the dot products and the quantized axpy are LLVM vector code (``vecdot``): int8/int4 codes are
  dotted with an int8 copy of x (``quantize_x``) by integer multiply-adds, four <8 x float>
  accumulators stay in registers, and lanes are summed once per vector;
- offsets into a record are unsigned (``U``): with signed runtime offsets numba must wrap negative
  indices, which keeps LLVM from vectorizing the plain loops (6-9x slower);
- each thread's accumulator row is indexed in place (``acc[t, j]``), never taken as a view per
  record: a view touches the array's reference count, shared by all threads (several times slower);
- f16 values are converted by LLVM's half-to-float conversion (``vecdot.f16``: vcvtph2ps with F16C), since
  numba has no float16 type on the CPU.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

from storage.quant import dequantize_q8

from .vecdot import axpy_q4 as _axpy_q4, axpy_q8 as _axpy_q8, dot_f16, f16 as _f16, prefetch_row, qdot_q4, qdot_q8

U = np.uint64     # record offsets are cast to unsigned: see the module docstring
AHEAD = 2         # the record this many ahead is prefetched (measured: 7% faster than none)


def _f32(v):
    """A record element as float32: f16 bits are converted, f32 values pass through."""


@overload(_f32, inline="always")
def _f32_impl(v):
    if v == types.uint16:
        return lambda v: _f16(v)
    return lambda v: np.float32(v)


@njit(inline="always", fastmath=True)
def _silu_mul(g, u):
    return g / (np.float32(1) + np.exp(-g)) * u


def _dot(rec, r, off, x, d):
    """rec[r, off:off + d] (f16 bits or f32) . x [d]."""


@overload(_dot, fastmath=True)
def _dot_impl(rec, r, off, x, d):
    if rec.dtype == types.uint16:
        def f16(rec, r, off, x, d):      # vectorized over the first multiple of 32, then the tail
            n32 = d - d % 32
            tail = np.float32(0)
            for j in range(n32, d):
                tail += _f16(rec[r, off + U(j)]) * x[j]
            return dot_f16(rec, r, U(2) * off, x, U(n32)) + tail
        return f16

    def f32(rec, r, off, x, d):          # f32 bundles: a plain loop, which LLVM vectorizes
        tot = np.float32(0)
        for j in range(d):
            tot = tot + rec[r, off + U(j)] * x[j]
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
def _sum_threads(acc, out):
    # out [d] += the per-thread accumulators acc [nt, d]
    for t in range(acc.shape[0]):
        for j in range(out.shape[0]):
            out[j] += acc[t, j]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_float(rec, rows, x, gate, up, down, bias, d, acc, out):
    # rec [n, R] f16 bits (uint16) or f32; gate/up/down/bias element offsets in a record, -1 if absent
    acc[:] = 0
    m = rows.shape[0]
    for k in prange(m):
        if k + AHEAD < m:
            prefetch_row(rec, U(rows[k + AHEAD]), U(rec.shape[1] * rec.itemsize))
        r = U(rows[k])
        u = _dot(rec, r, U(up), x, d)
        if gate < 0:
            u += _f32(rec[r, U(bias)])
            hv = u if u > 0 else np.float32(0)
        else:
            hv = _silu_mul(_dot(rec, r, U(gate), x, d), u)
        if hv != 0:
            _axpy(acc, numba.get_thread_id(), hv, rec, r, U(down), d)
    _sum_threads(acc, out)


@njit(inline="always", fastmath=True)
def _act_quant(p, q, s16, f32, r, xq, xd, xs, gq, uq, gs, us, gm, um, bias, ng):
    # one neuron's activation from quantized gate/up rows (q4 where a minimum offset is given, else q8)
    if um >= 0:
        u = qdot_q4(p, s16, r, U(uq), U(us), U(um), xq, xd, xs, ng)
    else:
        u = qdot_q8(q, s16, r, U(uq), U(us), xq, xd, ng)
    if gq < 0:
        u += f32[r, U(bias)]
        return u if u > 0 else np.float32(0)
    if gm >= 0:
        g = qdot_q4(p, s16, r, U(gq), U(gs), U(gm), xq, xd, xs, ng)
    else:
        g = qdot_q8(q, s16, r, U(gq), U(gs), xq, xd, ng)
    return _silu_mul(g, u)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_quant(p, q, s16, f32, rows, xq, xd, xs, gq, uq, dq, gs, us, ds, gm, um, dm, bias, ng, acc, out):
    # p [n, R] uint8 / q int8 / s16 [n, R/2] uint16 / f32 [n, R/4]: views of the same records. Code
    # offsets in bytes, scale/minimum offsets in u16 elements (minimum -1: that vector is q8), bias
    # in f32 elements (-1: gated). x as int8 (xq, xd) and its group sums xs.
    acc[:] = 0
    m = rows.shape[0]
    for k in prange(m):
        if k + AHEAD < m:
            prefetch_row(p, U(rows[k + AHEAD]), U(p.shape[1]))
        r = U(rows[k])
        hv = _act_quant(p, q, s16, f32, r, xq, xd, xs, gq, uq, gs, us, gm, um, bias, ng)
        if hv == 0:
            continue
        t = numba.get_thread_id()
        if dm < 0:
            _axpy_q8(acc, t, hv, q, s16, r, U(dq), U(ds), ng)
        else:
            _axpy_q4(acc, t, hv, p, s16, r, U(dq), U(ds), U(dm), ng)
    _sum_threads(acc, out)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _act_quant_rows(p, q, s16, f32, rows, xq, xd, xs, gq, uq, gs, us, gm, um, bias, ng, h):
    # h[rows[k]] = activation of record rows[k] (gate/up only: the down product is done elsewhere)
    m = rows.shape[0]
    for k in prange(m):
        if k + AHEAD < m:
            prefetch_row(p, U(rows[k + AHEAD]), U(p.shape[1]))
        r = U(rows[k])
        h[r] = _act_quant(p, q, s16, f32, r, xq, xd, xs, gq, uq, gs, us, gm, um, bias, ng)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _dequantize_field(p, q, s16, off, so, mo, ng, out):
    # out [c, 32 ng] f32 = one quantized vector of each record (q4 where mo >= 0, else q8): the
    # prefill's f32 matrices, built at memory speed rather than through numpy temporaries
    for r in prange(p.shape[0]):
        for g in range(ng):
            sg = _f16(s16[r, U(so) + U(g)])
            if mo >= 0:
                mg = _f16(s16[r, U(mo) + U(g)])
                for j in range(16):
                    v = p[r, U(off) + U(16 * g + j)]
                    out[r, 32 * g + j] = np.float32(v & np.uint8(15)) * sg + mg
                    out[r, 32 * g + 16 + j] = np.float32(v >> np.uint8(4)) * sg + mg
            else:
                for j in range(32):
                    out[r, 32 * g + j] = np.float32(q[r, U(off) + U(32 * g + j)]) * sg


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matvec_q8(q, s16, xq, xd, y):
    # q [n, k] int8 codes, s16 [n, k / 32] f16 bits; y [n] = dequantized q @ (x as int8: xq, xd)
    ng = q.shape[1] // 32
    for r in prange(q.shape[0]):
        y[r] = qdot_q8(q, s16, U(r), U(0), U(0), xq, xd, ng)


class RecordKernel:
    """The decode FFN over one bundle's records: field offsets from its layout, per-thread
    accumulators preallocated."""

    def __init__(self, layout, dtype: str, d_model: int):
        self.d, self.dtype = d_model, dtype
        # one accumulator per thread numba may run (numba.get_thread_id() indexes them)
        self.acc = np.zeros((numba.config.NUMBA_NUM_THREADS, d_model), np.float32)
        f = {x.name: x for x in layout.fields}
        if dtype in ("f16", "f32"):
            item = 2 if dtype == "f16" else 4
            off = {x.name: x.offset // item for x in layout.fields}
            self.gate, self.up, self.down = off.get("gate", -1), off["up"], off["down"]
            self.bias = off.get("up_bias", -1)
        else:
            # codes: byte offsets; scales/minimums: u16 offsets; the OPT up bias: f32 offset
            self.bias = f["up_bias"].offset // 4 if "up_bias" in f else -1
            self.q = {v: f[v].offset if v in f else -1 for v in ("gate", "up", "down")}
            self.s = {v: f[v + ".scale"].offset // 2 if v + ".scale" in f else -1 for v in ("gate", "up", "down")}
            self.m = {v: f[v + ".min"].offset // 2 if v + ".min" in f else -1 for v in ("gate", "up", "down")}
            self.xq = np.zeros(d_model, np.int8)                 # x as int8 codes, scales, sums
            self.xd = np.zeros(d_model // 32, np.float32)
            self.xs = np.zeros(d_model // 32, np.float32)

    @property
    def nbytes(self) -> int:
        return self.acc.nbytes + sum(getattr(self, n, self.acc[:0]).nbytes for n in ("xq", "xd", "xs"))

    def __call__(self, recs: np.ndarray, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out [d] += FFN over records ``recs[rows]``; recs [n, record_bytes] uint8, x [d] f32."""
        if len(rows) == 0:
            return
        if self.dtype in ("f16", "f32"):
            _ffn_float(recs.view(np.uint16 if self.dtype == "f16" else np.float32), rows, x, self.gate,
                       self.up, self.down, self.bias, self.d, self.acc, out)
            return
        q, s, m, ng = self.q, self.s, self.m, self.d // 32
        quantize_x(x, self.xq, self.xd, self.xs)
        _ffn_quant(recs, recs.view(np.int8), recs.view(np.uint16), recs.view(np.float32), rows, self.xq,
                   self.xd, self.xs, q["gate"], q["up"], q["down"], s["gate"], s["up"], s["down"], m["gate"],
                   m["up"], m["down"], self.bias, ng, self.acc, out)


    def activations(self, recs: np.ndarray, rows: np.ndarray, x: np.ndarray, h: np.ndarray) -> None:
        """h[rows] = the activations of quantized records ``recs[rows]`` (gate and up only; recs
        may end before the down column), x [d] f32; other entries of h are left as they are."""
        q, s, m = self.q, self.s, self.m
        quantize_x(x, self.xq, self.xd, self.xs)
        _act_quant_rows(recs, recs.view(np.int8), recs.view(np.uint16), recs.view(np.float32), rows, self.xq,
                        self.xd, self.xs, q["gate"], q["up"], s["gate"], s["up"], m["gate"], m["up"], self.bias,
                        self.d // 32, h)

    def dequantize(self, part: np.ndarray, name: str, out: np.ndarray) -> np.ndarray:
        """Vector ``name`` (gate/up/down) of quantized records part [c, record_bytes] as f32 into
        out [>= c, d]; returns out[:c]."""
        c = part.shape[0]
        _dequantize_field(part, part.view(np.int8), part.view(np.uint16), self.q[name], self.s[name],
                          self.m[name], self.d // 32, out[:c])
        return out[:c]


class QuantMatrix:
    """A dense matrix [out, in] stored as int8 codes with an f16 scale per 32 values of a row
    (``storage.format.quantized_dense``); ``matmul`` is what ``models.common.linear`` calls, and
    ``rows`` what an embedding lookup calls.

    One token (decode) runs the parallel numba matrix-vector kernel on the codes; several tokens
    (prefill) dequantize UPCAST_BYTES of f32 rows at a time for BLAS.
    """

    UPCAST_BYTES = 16 << 20

    def __init__(self, codes: np.ndarray, scales: np.ndarray):
        self.codes, self.scales16 = codes, scales.view(np.uint16)    # [out, in] int8, [out, in/32]
        self.shape = codes.shape
        n, k = codes.shape                 # decode scratch: x as int8 codes, group scales and sums
        self.xq, self.xd, self.xs = np.empty(k, np.int8), np.empty(k // 32, np.float32), np.empty(k // 32, np.float32)
        self.y = torch.empty(1, n)         # the decode output [1, out], reused: valid until the next call

    @staticmethod
    def scratch_bytes(n: int, k: int) -> int:
        """Decode scratch of an [n, k] matrix: int8 x, its group scales and sums, the output row."""
        return k + 2 * 4 * (k // 32) + 4 * n

    def scratch_arrays(self) -> list:
        return [self.xq, self.xd, self.xs, self.y]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales16.nbytes + self.scratch_bytes(*self.shape)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` [T] -> [T, in] f32 (an embedding lookup)."""
        i = ids.numpy()
        return torch.from_numpy(dequantize_q8(self.codes[i], self.scales16[i].view(np.float16)))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] f32 -> [T, out] f32. For one token the result is this matrix's reused output
        row: valid until its next call (callers that keep it, like the head's logits, copy it)."""
        if x.shape[0] == 1:
            quantize_x(np.ascontiguousarray(x[0].numpy()), self.xq, self.xd, self.xs)
            _matvec_q8(self.codes, self.scales16, self.xq, self.xd, self.y[0].numpy())
            return self.y
        rows = max(1, self.UPCAST_BYTES // (4 * self.shape[1]))
        s = self.scales16.view(np.float16)
        return torch.cat([F.linear(x, torch.from_numpy(dequantize_q8(self.codes[a:a + rows], s[a:a + rows])))
                          for a in range(0, self.shape[0], rows)], dim=-1)


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel variant on tiny inputs, so JIT
    memory and time land in the runtime baseline rather than in the first token."""
    from storage.config import ModelConfig
    from storage.format import record_layout
    for gated in (True, False):
        cfg = ModelConfig(arch="llama" if gated else "opt", n_layers=1, d_model=32, d_ff=2, n_heads=1,
                          n_kv_heads=(1,), head_dim=32, vocab_size=2, max_position=8, norm_eps=1e-5,
                          activation="silu" if gated else "relu")
        for dtype in ("f16", "f32", "int8", "int4"):
            lay = record_layout(cfg, dtype)
            k = RecordKernel(lay, dtype, 32)
            k(np.zeros((2, lay.record_bytes), np.uint8), np.arange(2), np.ones(32, np.float32),
              np.zeros(32, np.float32))
    QuantMatrix(np.zeros((2, 32), np.int8), np.zeros((2, 1), np.float16)).matmul(torch.ones(1, 32))
