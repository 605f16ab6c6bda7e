"""Hot path: the FFN of gathered neuron records for one token (numba, parallel, GIL released).

HOT: called once per layer per decode token. No I/O; no allocation besides what the caller
preallocates (thread scratch and accumulators live in :class:`RecordKernel`).

A record holds a neuron's fields in the bundle's layout (``storage.format``): for gated models gate
row, up row, down column; for OPT up row, down column, up bias. The kernel reads each selected
record once: out[d] += act(gate . x, up . x) * down. f16 records are converted in registers by
bit manipulation (numba has no float16 on the CPU): f32 bits = (h & 0x7fff) << 13 | sign << 16, then
x 2^112 rebiases the exponent, which is exact for normal and subnormal halves (weights are finite).
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from storage.quant import dequantize_q8

_SCALE = np.float32(2.0 ** 112)


@njit(inline="always", fastmath=True)
def _silu_mul(g, u):
    return g / (np.float32(1) + np.exp(-g)) * u


@njit(inline="always", fastmath=True)
def _sum_threads(acc, out):
    # out [d] += the per-thread accumulators acc [nt, d]
    for t in range(acc.shape[0]):
        for j in range(out.shape[0]):
            out[j] += acc[t, j]


@njit(inline="always", fastmath=True)
def _axpy_q8(a, hv, q, off, bf, so, ng):
    # a [d] += hv * (q8 vector at byte off, group scales bf[so:so + ng])
    for gi in range(ng):
        c = hv * bf[so + gi]
        b = off + gi * 32
        xb = gi * 32
        for j in range(32):
            a[xb + j] += c * np.float32(q[b + j])


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_f16(recs, rows, x, gate, up, down, bias, d, buf_u, buf_f, acc, out):
    # recs [n, R] uint16 (f16 bits); rows [m] int64 (record indices); x [d] f32
    # buf_u/buf_f [nt, P] the same memory as uint32/float32; acc [nt, d] f32; out [d] f32 (+=)
    nt = acc.shape[0]
    m = rows.shape[0]
    per = (m + nt - 1) // nt
    P = buf_u.shape[1]
    for t in prange(nt):
        a = acc[t]
        a[:] = 0
        bu = buf_u[t]
        bf = buf_f[t]
        for k in range(t * per, min(m, (t + 1) * per)):
            src = recs[rows[k]]
            for j in range(P):
                h = np.uint32(src[j])
                bu[j] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
            for j in range(P):
                bf[j] *= _SCALE
            hv = _neuron(bf, x, gate, up, bias, d)
            if hv != 0:
                for j in range(d):
                    a[j] += hv * bf[down + j]
    _sum_threads(acc, out)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_f32(recs, rows, x, gate, up, down, bias, d, acc, out):
    # recs [n, R] float32; otherwise as _ffn_f16
    nt = acc.shape[0]
    m = rows.shape[0]
    per = (m + nt - 1) // nt
    for t in prange(nt):
        a = acc[t]
        a[:] = 0
        for k in range(t * per, min(m, (t + 1) * per)):
            src = recs[rows[k]]
            hv = _neuron(src, x, gate, up, bias, d)
            if hv != 0:
                for j in range(d):
                    a[j] += hv * src[down + j]
    _sum_threads(acc, out)


# ---- group-quantized records (storage/quant.py): q8 codes * scale, q4 codes * scale + minimum.
# A record's f16 scales (and minimums) are one contiguous run of ``ns`` values starting at u16
# index ``sc``; they are converted into the thread's f32 scratch first, then every group of 32
# codes is dotted with x and scaled once.

@njit(inline="always", fastmath=True)
def _scales(s16, sc, ns, bu, bf):
    for j in range(ns):
        h = np.uint32(s16[sc + j])
        bu[j] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
    for j in range(ns):
        bf[j] *= _SCALE


# The group dots accumulate into 32 lanes and reduce once per vector: a horizontal sum per group of
# 32 was measured 2.5x slower (0.91 vs 0.36 ns per value, one core).
@njit(inline="always", fastmath=True)
def _dot_q8(q, off, bf, so, x, ng, ln):
    ln[:] = 0
    for gi in range(ng):
        sg = bf[so + gi]
        b = off + gi * 32
        xb = gi * 32
        for j in range(32):
            ln[j] += np.float32(q[b + j]) * sg * x[xb + j]
    tot = np.float32(0)
    for j in range(32):
        tot += ln[j]
    return tot


@njit(inline="always", fastmath=True)
def _dot_q4(p, off, bf, so, mo, x, xs, ng, ln):
    ln[:] = 0
    tot = np.float32(0)
    for gi in range(ng):
        sg = bf[so + gi]
        b = off + gi * 16
        xb = gi * 32
        for k in range(16):
            v = p[b + k]
            ln[k] += np.float32(v & np.uint8(15)) * sg * x[xb + k]
            ln[16 + k] += np.float32(v >> np.uint8(4)) * sg * x[xb + 16 + k]
        tot += bf[mo + gi] * xs[gi]
    for j in range(32):
        tot += ln[j]
    return tot


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_q8(r8, r16, r32, rows, x, sc, ns, gq, uq, dq, gs, us, ds, bias, d, buf_u, buf_f, lanes, acc, out):
    # r8 [n, R] int8 / r16 [n, R/2] uint16 / r32 [n, R/4] f32: views of the same records
    nt = acc.shape[0]
    m = rows.shape[0]
    per = (m + nt - 1) // nt
    ng = d // 32
    for t in prange(nt):
        a = acc[t]
        a[:] = 0
        bu = buf_u[t]
        bf = buf_f[t]
        ln = lanes[t]
        for k in range(t * per, min(m, (t + 1) * per)):
            r = rows[k]
            q = r8[r]
            _scales(r16[r], sc, ns, bu, bf)
            u = _dot_q8(q, uq, bf, us, x, ng, ln)
            if gq < 0:
                u += r32[r, bias]
                hv = u if u > 0 else np.float32(0)
            else:
                hv = _silu_mul(_dot_q8(q, gq, bf, gs, x, ng, ln), u)
            if hv != 0:
                _axpy_q8(a, hv, q, dq, bf, ds, ng)
    _sum_threads(acc, out)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _ffn_q4(r8, ri8, r16, r32, rows, x, xs, sc, ns, gq, uq, dq, gs, us, ds, gm, um, dm, bias, d,
            buf_u, buf_f, lanes, acc, out):
    # r8 [n, R] uint8 (packed codes), ri8 the same as int8; xs [d / 32] f32: sums of x per group (for
    # the minimums); dm < 0: the down column is q8 codes at byte dq
    nt = acc.shape[0]
    m = rows.shape[0]
    per = (m + nt - 1) // nt
    ng = d // 32
    for t in prange(nt):
        a = acc[t]
        a[:] = 0
        bu = buf_u[t]
        bf = buf_f[t]
        ln = lanes[t]
        for k in range(t * per, min(m, (t + 1) * per)):
            r = rows[k]
            p = r8[r]
            q8 = ri8[r]
            _scales(r16[r], sc, ns, bu, bf)
            u = _dot_q4(p, uq, bf, us, um, x, xs, ng, ln)
            if gq < 0:
                u += r32[r, bias]
                hv = u if u > 0 else np.float32(0)
            else:
                hv = _silu_mul(_dot_q4(p, gq, bf, gs, gm, x, xs, ng, ln), u)
            if hv != 0 and dm < 0:        # down column stored q8 (record_layout's int4 rule)
                _axpy_q8(a, hv, q8, dq, bf, ds, ng)
            elif hv != 0:
                for gi in range(ng):
                    c = hv * bf[ds + gi]
                    hm = hv * bf[dm + gi]
                    b = dq + gi * 16
                    xb = gi * 32
                    for j in range(16):
                        v = p[b + j]
                        a[xb + j] += c * np.float32(v & np.uint8(15)) + hm
                        a[xb + 16 + j] += c * np.float32(v >> np.uint8(4)) + hm
    _sum_threads(acc, out)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matvec_q8(q, s16, x, y, buf_u, buf_f, lanes):
    # q [n, k] int8 codes, s16 [n, k / 32] f16 bits; y [n] = dequantized q @ x, rows split over threads
    nt = buf_u.shape[0]
    n = q.shape[0]
    ng = q.shape[1] // 32
    per = (n + nt - 1) // nt
    for t in prange(nt):
        bu = buf_u[t]
        bf = buf_f[t]
        ln = lanes[t]
        for r in range(t * per, min(n, (t + 1) * per)):
            _scales(s16[r], 0, ng, bu, bf)
            y[r] = _dot_q8(q[r], 0, bf, 0, x, ng, ln)


@njit(inline="always", fastmath=True)
def _neuron(r, x, gate, up, bias, d):
    """Activation of one neuron from its record r (f32 view): silu(gate.x) * (up.x), or relu(up.x + b)."""
    u = np.float32(0)
    for j in range(d):
        u += r[up + j] * x[j]
    if gate < 0:
        u += r[bias]
        return u if u > 0 else np.float32(0)
    g = np.float32(0)
    for j in range(d):
        g += r[gate + j] * x[j]
    return _silu_mul(g, u)


class RecordKernel:
    """Preallocated scratch for the kernels, bound to one bundle's record layout."""

    def __init__(self, layout, dtype: str, d_model: int, threads: int | None = None):
        self.d, self.dtype = d_model, dtype
        nt = threads or numba.get_num_threads()
        self.acc = np.zeros((nt, d_model), np.float32)
        f = {x.name: x for x in layout.fields}
        self.bias = f["up_bias"].offset // 4 if "up_bias" in f else -1
        if dtype in ("f16", "f32"):
            self.item = 2 if dtype == "f16" else 4
            off = {x.name: x.offset // self.item for x in layout.fields}
            self.gate, self.up, self.down = off.get("gate", -1), off["up"], off["down"]
            self.bias = off.get("up_bias", -1)
            scratch = layout.payload_bytes // self.item
        else:
            # codes: byte offsets; scales/minimums: indices into the record's converted run of them
            sfields = [x for x in layout.fields if "." in x.name]
            self.sc = sfields[0].offset // 2
            self.ns = sum(x.count for x in sfields)
            idx = {x.name: (x.offset // 2 - self.sc) for x in sfields}
            self.q = {v: f[v].offset if v in f else -1 for v in ("gate", "up", "down")}
            self.s = {v: idx.get(v + ".scale", -1) for v in ("gate", "up", "down")}
            self.m = {v: idx.get(v + ".min", -1) for v in ("gate", "up", "down")}
            self.xs = np.zeros(d_model // 32, np.float32)
            scratch = self.ns
        self.buf_u = np.zeros((nt, scratch), np.uint32)
        self.buf_f = self.buf_u.view(np.float32)
        self.lanes = np.zeros((nt, 32), np.float32)

    @property
    def nbytes(self) -> int:
        return (self.acc.nbytes + self.buf_u.nbytes + self.lanes.nbytes
                + getattr(self, "xs", self.acc[:0]).nbytes)

    def __call__(self, recs: np.ndarray, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out [d] += FFN over records ``recs[rows]``; recs [n, record_bytes] uint8, x [d] f32."""
        if len(rows) == 0:
            return
        if self.dtype == "f16":
            _ffn_f16(recs.view(np.uint16), rows, x, self.gate, self.up, self.down, self.bias, self.d,
                     self.buf_u, self.buf_f, self.acc, out)
        elif self.dtype == "f32":
            _ffn_f32(recs.view(np.float32), rows, x, self.gate, self.up, self.down, self.bias, self.d,
                     self.acc, out)
        elif self.dtype == "int8":
            q, s = self.q, self.s
            _ffn_q8(recs.view(np.int8), recs.view(np.uint16), recs.view(np.float32), rows, x, self.sc,
                    self.ns, q["gate"], q["up"], q["down"], s["gate"], s["up"], s["down"], self.bias,
                    self.d, self.buf_u, self.buf_f, self.lanes, self.acc, out)
        else:
            q, s, m = self.q, self.s, self.m
            np.sum(x.reshape(-1, 32), axis=1, out=self.xs)
            _ffn_q4(recs, recs.view(np.int8), recs.view(np.uint16), recs.view(np.float32), rows, x, self.xs,
                    self.sc, self.ns,
                    q["gate"], q["up"], q["down"], s["gate"], s["up"], s["down"], m["gate"], m["up"],
                    m["down"], self.bias, self.d, self.buf_u, self.buf_f, self.lanes, self.acc, out)


class QuantMatrix:
    """A dense matrix [out, in] stored as int8 codes with an f16 scale per 32 values of a row
    (``storage.format.quantized_dense``); ``matmul`` is what ``models.common.linear`` calls.

    One token (decode) runs the parallel numba matrix-vector kernel on the codes; several tokens
    (prefill) dequantize UPCAST_BYTES of f32 rows at a time for BLAS.
    """

    UPCAST_BYTES = 16 << 20

    def __init__(self, codes: np.ndarray, scales: np.ndarray, threads: int | None = None):
        self.codes, self.scales16 = codes, scales.view(np.uint16)    # [out, in] int8, [out, in/32]
        self.shape = codes.shape
        nt = threads or numba.get_num_threads()
        self.buf_u = np.zeros((nt, codes.shape[1] // 32), np.uint32)
        self.buf_f = self.buf_u.view(np.float32)
        self.lanes = np.zeros((nt, 32), np.float32)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales16.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] f32 -> [T, out] f32."""
        if x.shape[0] == 1:
            y = np.empty(self.shape[0], np.float32)
            _matvec_q8(self.codes, self.scales16, np.ascontiguousarray(x[0].numpy()), y, self.buf_u,
                       self.buf_f, self.lanes)
            return torch.from_numpy(y)[None]
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
            k = RecordKernel(lay, dtype, 32, threads=1)
            k(np.zeros((2, lay.record_bytes), np.uint8), np.arange(2), np.ones(32, np.float32),
              np.zeros(32, np.float32))
    m = QuantMatrix(np.zeros((2, 32), np.int8), np.zeros((2, 1), np.float16), threads=1)
    _matvec_q8(m.codes, m.scales16, np.ones(32, np.float32), np.zeros(2, np.float32), m.buf_u, m.buf_f,
               m.lanes)
