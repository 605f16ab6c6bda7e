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
from numba import njit, prange

_SCALE = np.float32(2.0 ** 112)


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
    for t in range(nt):
        for j in range(d):
            out[j] += acc[t, j]


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
    for t in range(nt):
        for j in range(d):
            out[j] += acc[t, j]


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
    return g / (np.float32(1) + np.exp(-g)) * u


class RecordKernel:
    """Preallocated scratch for the kernels, bound to one bundle's record layout."""

    def __init__(self, layout, dtype: str, d_model: int, threads: int | None = None):
        self.item = 2 if dtype == "f16" else 4
        off = {f.name: f.offset // self.item for f in layout.fields}
        self.gate, self.up, self.down = off.get("gate", -1), off["up"], off["down"]
        self.bias = off.get("up_bias", -1)
        self.d, self.dtype = d_model, dtype
        self.payload = layout.payload_bytes // self.item
        nt = threads or numba.get_num_threads()
        self.acc = np.zeros((nt, d_model), np.float32)
        self.buf_u = np.zeros((nt, self.payload), np.uint32)
        self.buf_f = self.buf_u.view(np.float32)

    @property
    def nbytes(self) -> int:
        return self.acc.nbytes + self.buf_u.nbytes

    def __call__(self, recs: np.ndarray, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out [d] += FFN over records ``recs[rows]``; recs [n, record_bytes] uint8, x [d] f32."""
        if len(rows) == 0:
            return
        if self.dtype == "f16":
            _ffn_f16(recs.view(np.uint16), rows, x, self.gate, self.up, self.down, self.bias, self.d,
                     self.buf_u, self.buf_f, self.acc, out)
        else:
            _ffn_f32(recs.view(np.float32), rows, x, self.gate, self.up, self.down, self.bias, self.d,
                     self.acc, out)


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every kernel variant on tiny inputs, so JIT
    memory and time land in the runtime baseline rather than in the first token."""
    from storage.format import Field, RecordLayout
    for dtype, item in (("f16", 2), ("f32", 4)):
        for gated in (True, False):
            names = ["gate", "up", "down"] if gated else ["up", "down", "up_bias"]
            fields = tuple(Field(n, dtype, i * 4 * item, 1 if n == "up_bias" else 4)
                           for i, n in enumerate(names))
            lay = RecordLayout(fields, 512, 12 * item)
            k = RecordKernel(lay, dtype, 4, threads=1)
            k(np.zeros((2, 512), np.uint8), np.arange(2), np.ones(4, np.float32), np.zeros(4, np.float32))
