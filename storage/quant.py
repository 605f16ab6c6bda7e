"""Group quantization of FFN vectors: int8 (symmetric) and int4 (scale + minimum), 32 per group.

Each vector (a neuron's gate row, up row or down column; ``d`` values, ``d`` a multiple of
``GROUP``) is cut into groups of 32 consecutive values, each with its own f16 scale, so a neuron's
record stays one self-describing span (see ``storage.format.record_layout``):

* ``q8``: ``q = round(w / s)`` in [-127, 127] with ``s = max|w| / 127``; ``w ~ q * s``.
* ``q4``: ``q = round((w - m) / s)`` in [0, 15], ``w ~ q * s + m``; (s, m) is the best of the
  group's min/max grid, least-squares refits of it, and the grid the values already lie on when
  they come from a 4-bit checkpoint (see ``quantize_q4``). Two values per byte: in group g, byte k
  holds value k in its low nibble and value k + 16 in its high nibble (so a kernel reads x[k] and
  x[k + 16], both contiguous runs).

* ``q5``: as q4 with codes in [0, 31] (the down columns of int4 records, see
  ``storage.format.record_layout``): a vector's low nibbles packed as q4's, then its fifth bits, 4
  bytes per group (bit i % 8 of byte i // 8 for value i of the group).

Scales and minimums are rounded to f16 first and the codes computed from the rounded values, so
dequantization reproduces exactly what the codes were chosen against. q8's error per value is at
most half a step (``s / 2``); q4's squared error per group is at most that of the min/max grid.
"""
from __future__ import annotations

import numpy as np

GROUP = 32
QDTYPES = ("q8", "q5", "q4")


def _groups(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    n, d = w.shape
    if d % GROUP:
        raise ValueError(f"vectors of {d} values cannot be cut into groups of {GROUP}")
    return w.reshape(n, d // GROUP, GROUP)


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [n, d] -> (codes int8 [n, d], scales f16 [n, d / 32])."""
    g = _groups(w)
    s = (np.abs(g).max(axis=2) / 127).astype(np.float16)                  # [n, ng]
    s32 = s.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(g / s32), 0)
    return np.clip(q, -127, 127).astype(np.int8).reshape(w.shape), s


def dequantize_q8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    n, d = q.shape
    return (q.reshape(n, -1, GROUP).astype(np.float32) * s.astype(np.float32)[..., None]).reshape(n, d)


def _codes(g: np.ndarray, s: np.ndarray, m: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes in [0, top] for groups g [n, ng, 32] on the grid (s, m) rounded to f16; returns (q, s16, m16)."""
    s16, m16 = s.astype(np.float16), m.astype(np.float16)
    s32, m32 = s16.astype(np.float32)[..., None], m16.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint((g - m32) / s32), 0)
    return np.clip(q, 0, top), s16, m16


def _lattice_step(g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per group the smallest gap between its distinct values [n, ng]: the step of the grid the
    values lie on when they were dequantized from a 4-bit checkpoint (Q4_K, Q4_1: 32 values per
    sub-block, so our groups are theirs). Re-rounding such values onto a min/max grid costs 3% RMS
    error (measured on Qwen2.5-Coder-1.5B's Q4_K gate rows); on their own grid they are exact up to
    the f16 rounding of scale and minimum."""
    v = np.sort(g, axis=2)
    gap = np.diff(v, axis=2)
    tol = 1e-3 * (hi - lo)[..., None]                 # f32 products of a grid differ in the last bits
    step = np.where(gap > tol, gap, np.inf).min(axis=2)
    return np.where(np.isfinite(step) & ((hi - lo) <= 15.5 * step), step, (hi - lo) / 15)


def _fit_grid(w: np.ndarray, top: int, refits: int, lattice: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes uint8 [n, ng, 32] in [0, top], scales and minimums (f16) of w's groups.

    Candidates per group: the min/max grid, ``refits`` least-squares fits of (scale, minimum) to
    the current codes (with few levels the min/max grid wastes them on outliers), and (``lattice``)
    the 16-level grid the values already lie on (``_lattice_step``); each group keeps the one with
    the smallest squared error."""
    g = _groups(w)                                                         # [n, ng, 32]
    lo, hi = g.min(axis=2), g.max(axis=2)
    q, s16, m16 = _codes(g, (hi - lo) / top, lo, top)

    def sq_err(q, s16, m16):
        return ((q * s16.astype(np.float32)[..., None] + m16.astype(np.float32)[..., None] - g) ** 2).sum(2)
    best = sq_err(q, s16, m16)

    def keep(q2, s2, m2):
        nonlocal q, s16, m16, best
        err = sq_err(q2, s2, m2)
        better = err < best
        q = np.where(better[..., None], q2, q)
        s16, m16, best = np.where(better, s2, s16), np.where(better, m2, m16), np.minimum(err, best)
    if lattice:
        keep(*_codes(g, _lattice_step(g, lo, hi), lo, top))
    for _ in range(refits):
        # least squares of g ~ s * q + m over each group's 32 values
        n = g.shape[2]
        sq, sw = q.sum(2), g.sum(2)
        sqq, sqw = (q * q).sum(2), (q * g).sum(2)
        den = n * sqq - sq * sq
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(den > 0, (n * sqw - sq * sw) / den, 0)
        s = np.maximum(s, 0)
        m = (sw - s * sq) / n
        keep(*_codes(g, s, m, top))
    return q.astype(np.uint8), s16, m16


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, ng, 32] (their low 4 bits) -> [n, 16 ng]: value k of a group in byte k's low
    nibble, value k + 16 in its high one."""
    q = q & 15
    return (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(q.shape[0], -1)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    p = packed.reshape(packed.shape[0], -1, GROUP // 2)
    return np.concatenate((p & 15, p >> 4), axis=2)                       # [n, ng, 32]


def quantize_q4(w: np.ndarray, refits: int = 4, lattice: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [n, d] -> (packed codes uint8 [n, d / 2], scales f16 [n, d / 32], minimums f16 [n, d / 32]),
    the grid chosen per group as ``_fit_grid`` says."""
    q, s16, m16 = _fit_grid(w, 15, refits, lattice)
    return _pack_nibbles(q), s16, m16


def quantize_q5(w: np.ndarray, refits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [n, d] -> (codes uint8 [n, 5 d / 8]: the low nibbles [n, d / 2] packed as q4's, then the
    fifth bits [n, d / 8]; scales f16 [n, d / 32], minimums f16 [n, d / 32])."""
    q, s16, m16 = _fit_grid(w, 31, refits, lattice=True)      # a 4-bit source's grid fits in 32 levels too
    bits = np.packbits(q >> 4, axis=2, bitorder="little")                  # [n, ng, 4]
    return np.concatenate([_pack_nibbles(q), bits.reshape(q.shape[0], -1)], axis=1), s16, m16


def dequantize_q5(codes: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    n, d = codes.shape[0], codes.shape[1] * 8 // 5
    lo = _unpack_nibbles(codes[:, :d // 2])
    hi = np.unpackbits(codes[:, d // 2:].reshape(n, -1, 4), axis=2, bitorder="little")
    q = (lo | (hi << 4)).astype(np.float32)
    return (q * s.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]).reshape(n, d)


def dequantize_q4(packed: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    n = packed.shape[0]
    q = _unpack_nibbles(packed).astype(np.float32)                          # [n, ng, 32]
    w = q * s.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    return w.reshape(n, -1)
