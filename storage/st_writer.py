"""A streaming safetensors writer: header first (from declared specs), then tensors in order.

Tensors are declared up front so the header (and every offset) is known before any data is
written; each ``write`` must then supply the next declared tensor with the declared dtype and
shape (writes in the wrong order fail at once). The header is padded with spaces so the data
section starts on a ``TENSOR_ALIGN`` boundary. A sha256 of the whole file is computed on the way.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .format import ST_DTYPE, TENSOR_ALIGN


def encode_header(specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int], int]:
    """(padded header JSON, data offset of each tensor, total file bytes) of a file of ``specs``.

    The file is the 8-byte header length, the header, then the tensors back to back; the size of a
    bundle file is known from its specs alone (``estimate`` uses this before any conversion).
    """
    header, off, offsets = {}, 0, {}
    if metadata:
        header["__metadata__"] = metadata
    for name, dt, shape in specs:
        dt = np.dtype(dt)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": ST_DTYPE[dt], "shape": [int(x) for x in shape],
                        "data_offsets": [off, off + nbytes]}
        offsets[name] = off
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % TENSOR_ALIGN)
    return raw, offsets, 8 + len(raw) + off


class SafetensorsWriter:
    def __init__(self, path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = [(n, np.dtype(d), tuple(int(x) for x in s)) for n, d, s in specs]
        raw, self.offsets, self.total_bytes = encode_header(self._specs, metadata)
        self.data_start = 8 + len(raw)
        self._next = 0
        self._hash = hashlib.sha256()
        self._f = open(self.path, "wb")
        head = struct.pack("<Q", len(raw)) + raw
        self.header_sha256 = hashlib.sha256(head).hexdigest()
        self._put(head)

    def _put(self, buf) -> None:
        self._f.write(buf)
        self._hash.update(buf)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor '{name}' written after all declared tensors")
        want, dt, shape = self._specs[self._next]
        if name != want or array.dtype != dt or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor '{want}' {dt} {shape}, "
                             f"got '{name}' {array.dtype} {tuple(array.shape)}")
        buf = memoryview(np.ascontiguousarray(array)).cast("B")
        self._put(buf)
        self._next += 1

    def close(self) -> dict:
        """Finish the file (all declared tensors must be written); returns {bytes, sha256,
        header_sha256} (the header's own hash: the reader checks it on every open)."""
        if self._next != len(self._specs):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._specs)} tensors")
        self._f.flush()
        import os
        os.fsync(self._f.fileno())
        self._f.close()
        return {"bytes": self.total_bytes, "sha256": self._hash.hexdigest(), "header_sha256": self.header_sha256}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
