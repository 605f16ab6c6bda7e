"""Group quantization of FFN vectors: int8 (symmetric) and int4 (scale + minimum), 32 per group.

Each vector (a neuron's gate row, up row or down column; ``d`` values, ``d`` a multiple of
``GROUP``) is cut into groups of 32 consecutive values, each with its own f16 scale, so a neuron's
record stays one self-describing span (see ``storage.format.record_layout``):

* ``q8``: ``q = round(w / s)`` in [-127, 127] with ``s = max|w| / 127``; ``w ~ q * s``.
* ``q4``: ``q = round((w - m) / s)`` in [0, 15], ``w ~ q * s + m``; (s, m) start at the group's
  min/max and are refined by least squares on the codes (see ``quantize_q4``). Two values per byte: in group g, byte k holds value k in its low nibble and
  value k + 16 in its high nibble (so a kernel reads x[k] and x[k + 16], both contiguous runs).

Scales and minimums are rounded to f16 first and the codes computed from the rounded values, so
dequantization reproduces exactly what the codes were chosen against. q8's error per value is at
most half a step (``s / 2``); q4's squared error per group is at most that of the min/max grid.
"""
from __future__ import annotations

import numpy as np

GROUP = 32
QDTYPES = ("q8", "q4")


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


def _codes_q4(g: np.ndarray, s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes for groups g [n, ng, 32] on the grid (s, m) rounded to f16; returns (q, s16, m16)."""
    s16, m16 = s.astype(np.float16), m.astype(np.float16)
    s32, m32 = s16.astype(np.float32)[..., None], m16.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint((g - m32) / s32), 0)
    return np.clip(q, 0, 15), s16, m16


def quantize_q4(w: np.ndarray, refits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [n, d] -> (packed codes uint8 [n, d / 2], scales f16 [n, d / 32], minimums f16 [n, d / 32]).

    Starts from the group's min/max grid, then ``refits`` times fits (scale, minimum) to the
    current codes by least squares and re-rounds, keeping per group whichever grid had the
    smallest squared error (with 16 levels the min/max grid wastes levels on outliers)."""
    g = _groups(w)                                                         # [n, ng, 32]
    lo, hi = g.min(axis=2), g.max(axis=2)
    q, s16, m16 = _codes_q4(g, (hi - lo) / 15, lo)

    def sq_err(q, s16, m16):
        return ((q * s16.astype(np.float32)[..., None] + m16.astype(np.float32)[..., None] - g) ** 2).sum(2)
    best = sq_err(q, s16, m16)
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
        q2, s2, m2 = _codes_q4(g, s, m)
        err = sq_err(q2, s2, m2)
        better = err < best
        q = np.where(better[..., None], q2, q)
        s16, m16, best = np.where(better, s2, s16), np.where(better, m2, m16), np.minimum(err, best)
    q = q.astype(np.uint8)
    packed = q[:, :, :16] | (q[:, :, 16:] << 4)                            # [n, ng, 16]
    return packed.reshape(w.shape[0], -1), s16, m16


def dequantize_q4(packed: np.ndarray, s: np.ndarray, m: np.ndarray) -> np.ndarray:
    n = packed.shape[0]
    p = packed.reshape(n, -1, GROUP // 2)
    q = np.concatenate((p & 15, p >> 4), axis=2).astype(np.float32)        # [n, ng, 32]
    w = q * s.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    return w.reshape(n, -1)
