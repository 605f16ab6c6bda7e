"""A walk over a GGUF file's header, key/value metadata and tensor table before ``gguf.GGUFReader``
trusts it: every string and array length bounded by the bytes left in the file, every value type
known, tensor dimensions positive and data offsets aligned and inside the file. A damaged length
(an array of 2^40 strings) would otherwise make the reader grow without end."""
from __future__ import annotations

import struct

from .errors import CheckpointError

# value type -> element size (strings and arrays are walked)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


class _Walk:
    def __init__(self, data, path):
        self.data, self.at, self.path = data, 0, path

    def fail(self, what: str):
        raise CheckpointError(f"{self.path}: damaged GGUF ({what} at byte {self.at}); the file is corrupted or "
                              "truncated, fetch or export it again")

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            self.fail(f"a length of {n} bytes runs past the end of the file")
        b = self.data[self.at:self.at + n]
        self.at += n
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def value(self, kind: int, depth: int = 0):
        if kind in _SIZES:
            return self.take(_SIZES[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY and depth == 0:
            elem, n = self.u32(), self.u64()
            least = _SIZES.get(elem, 8)              # a string takes at least its 8-byte length
            if elem not in _SIZES and elem not in (STRING,):
                self.fail(f"an array of unknown type {elem}")
            if n * least > len(self.data) - self.at:
                self.fail(f"an array of {n} elements longer than the rest of the file")
            if elem in _SIZES:
                self.take(n * _SIZES[elem])
            else:
                for _ in range(n):
                    self.string()
            return None
        self.fail(f"unknown value type {kind}")


def check_gguf(path, data) -> None:
    """Raise a CheckpointError for a GGUF whose structure cannot be trusted (``data``: its bytes, e.g. a mmap)."""
    w = _Walk(data, path)
    if w.take(4) != b"GGUF":
        w.fail("no GGUF magic")
    version = w.u32()
    if version not in (2, 3):
        w.fail(f"GGUF version {version}; this reads versions 2 and 3")
    n_tensors, n_kv = w.u64(), w.u64()
    if n_tensors > len(data) or n_kv > len(data):
        w.fail(f"{n_tensors} tensors and {n_kv} metadata keys cannot fit in {len(data)} bytes")
    align = 32
    for _ in range(n_kv):
        key = w.string()
        kind = w.u32()
        start = w.at
        w.value(kind)
        if key == b"general.alignment" and kind == 4:
            align = struct.unpack("<I", data[start:start + 4])[0]
            if align == 0 or align & (align - 1):
                w.fail(f"alignment {align} is not a power of two")
    tensors = []
    for _ in range(n_tensors):
        w.string()
        nd = w.u32()
        if not 1 <= nd <= MAX_DIMS:
            w.fail(f"a tensor with {nd} dimensions")
        dims = [w.u64() for _ in range(nd)]
        if any(d == 0 or d > len(data) * 2 for d in dims):
            w.fail(f"tensor dimensions {dims}")
        w.u32()
        off = w.u64()
        if off % align:
            w.fail(f"tensor data offset {off} not aligned to {align}")
        tensors.append(off)
    base = -(-w.at // align) * align
    if any(base + off > len(data) for off in tensors):
        w.fail("a tensor's data starts past the end of the file")
