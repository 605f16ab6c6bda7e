"""Hot path: the product of a quantized dense matrix (attention, head, a down matrix) with up to
SMALL_T tokens on its codes, and its dequantization for longer prefills and embedding lookups."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .records import SMALL_T, U, _dequantize_field, quantize_rows
from .vecdot import qdot_q4, qdot_q5, qdot_q8


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matmat_q8(q, s16, xq, xd, T, y):
    # q [n, k] int8 codes, s16 [n, k / 32] f16 bits; y[t] = dequantized q @ (x[t] as int8: xq, xd)
    # for t < T, each row read once for all T
    ng = q.shape[1] // 32
    for r in prange(q.shape[0]):
        for t in range(T):
            y[t, r] = qdot_q8(q, s16, U(r), U(0), U(0), xq, xd, U(t), ng)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matmat_q4(p, s16, xq, xd, xs, T, y):
    # _matmat_q8 for p [n, k / 2] packed q4 codes, s16 [n, k / 16]: each row's scales then minimums
    ng = p.shape[1] // 16
    for r in prange(p.shape[0]):
        for t in range(T):
            y[t, r] = qdot_q4(p, s16, U(r), U(0), U(0), U(ng), xq, xd, xs, U(t), ng)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _matmat_q5(p, s16, xq, xd, xs, T, y):
    # _matmat_q4 for p [n, 5 k / 8]: each row's q4 nibbles, then its fifth bits from byte k / 2
    ng = s16.shape[1] // 2
    for r in prange(p.shape[0]):
        for t in range(T):
            y[t, r] = qdot_q5(p, s16, U(r), U(0), U(0), U(ng), U(16 * ng), xq, xd, xs, U(t), ng)


class QuantMatrix:
    """A dense matrix [out, in] stored as codes with f16 group scales per 32 values of a row
    (``storage.format.dense_matrix_dtypes``): q8 (int8 codes [out, in], scales [out, in / 32]),
    q4 (packed codes uint8 [out, in / 2], each row's scales then minimums [out, in / 16]) or q5
    (uint8 [out, 5 in / 8]: q4's nibbles, then the fifth bits; q4's scales).
    ``matmul`` is what ``models.common.linear`` calls, and ``rows`` what an embedding lookup calls.

    Up to SMALL_T tokens run the parallel numba kernel on the codes (each row read once for all of
    them, each token's values exactly those of a one-token call); more tokens (a prefill) dequantize
    UPCAST_BYTES of f32 rows at a time for BLAS.
    """

    UPCAST_BYTES = 8 << 20       # as models.common.UPCAST_BYTES, which the budget counts

    def __init__(self, codes: np.ndarray, scales: np.ndarray):
        self.codes, self.scales16 = codes, scales.view(np.uint16)
        if codes.dtype == np.uint8:       # q4 and q5 hold two f16 values per group of 32
            self.kind = "q4" if codes.shape[1] * 2 == scales.shape[1] * 16 else "q5"
        else:
            self.kind = "q8"
        n, k = codes.shape[0], (codes.shape[1] * 2 if self.kind == "q4" else scales.shape[1] * 16
                                if self.kind == "q5" else codes.shape[1])
        self.shape = (n, k)
        self.ng = k // 32
        self.xq = np.empty((SMALL_T, k), np.int8)      # scratch: x as int8 codes, group scales and sums
        self.xd, self.xs = np.empty((SMALL_T, k // 32), np.float32), np.empty((SMALL_T, k // 32), np.float32)
        self.y = torch.empty(1, n)         # the decode output [1, out], reused: valid until the next call

    @staticmethod
    def scratch_bytes(n: int, k: int) -> int:
        """Scratch of an [n, k] matrix: int8 x, its group scales and sums per token, the output row."""
        return SMALL_T * (k + 2 * 4 * (k // 32)) + 4 * n

    def scratch_arrays(self) -> list:
        return [self.xq, self.xd, self.xs, self.y]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales16.nbytes + self.scratch_bytes(*self.shape)

    def _dequantize(self, a: int, b: int, out: np.ndarray) -> np.ndarray:
        """Rows a..b as f32 into out[:b - a]."""
        return self._dequantize_rows(self.codes[a:b], self.scales16[a:b], out)

    def _dequantize_rows(self, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> np.ndarray:
        c = codes.shape[0]
        if self.kind != "q8":
            ho = 16 * self.ng if self.kind == "q5" else -1
            _dequantize_field(codes, codes.view(np.int8), scales, 0, 0, self.ng, ho, self.ng, out[:c])
        else:
            _dequantize_field(codes.view(np.uint8), codes, scales, 0, 0, -1, -1, self.ng, out[:c])
        return out[:c]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` [T] -> [T, in] f32 (an embedding lookup)."""
        i = ids.numpy()
        out = np.empty((len(i), self.shape[1]), np.float32)
        return torch.from_numpy(self._dequantize_rows(self.codes[i], self.scales16[i], out))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] f32 -> [T, out] f32. For one token the result is this matrix's reused output
        row: valid until its next call (callers that keep it, like the head's logits, copy it)."""
        T = x.shape[0]
        if T <= SMALL_T:
            quantize_rows(np.ascontiguousarray(x.numpy()), self.xq, self.xd, self.xs)
            y = self.y if T == 1 else torch.empty(T, self.shape[0])
            if self.kind == "q4":
                _matmat_q4(self.codes, self.scales16, self.xq, self.xd, self.xs, T, y.numpy())
            elif self.kind == "q5":
                _matmat_q5(self.codes, self.scales16, self.xq, self.xd, self.xs, T, y.numpy())
            else:
                _matmat_q8(self.codes, self.scales16, self.xq, self.xd, T, y.numpy())
            return y
        rows = max(1, self.UPCAST_BYTES // (4 * self.shape[1]))
        buf = np.empty((min(rows, self.shape[0]), self.shape[1]), np.float32)
        out = torch.empty(T, self.shape[0])
        for a in range(0, self.shape[0], rows):
            b = min(self.shape[0], a + rows)
            out[:, a:b] = x @ torch.from_numpy(self._dequantize(a, b, buf)).t()
        return out
