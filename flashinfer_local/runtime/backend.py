"""The one interface every FFN backend implements, and what it reports.

The engine calls a backend without asking which mode it is in (all records in DRAM, a window cache
over the SSD, naive reads): ``backend(layer, x, mask)`` computes one layer's feed-forward output for
T >= 1 tokens, each token with its own selection of neurons. Measurement asks a backend what it
holds (``resident``: the arrays themselves, by owner) and what it did (``counters``), never its
private fields.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

# Owners a backend's arrays belong to (the names ``measure.profile`` and the budget plan use):
# every FFN record held in DRAM, the window caches' rows and bookkeeping, read and compute scratch.
BACKEND_OWNERS = ("ffn_dram", "window", "buffers")


@dataclass(frozen=True)
class FFNCounters:
    """What a backend did since it was built (monotonic; subtract two to get a span)."""
    selection_s: float = 0.0      # choosing the neurons (filled in by the engine, which selects)
    bookkeeping_s: float = 0.0    # window planning
    compute_s: float = 0.0
    io_wait_s: float = 0.0
    flash_bytes_read: int = 0
    read_ops: int = 0
    gap_bytes_read: int = 0       # part of flash_bytes_read read through gaps between wanted runs
    lookups: int = 0              # neurons selected (summed over layers and forwards)
    hits: int = 0                 # of those, found in the window cache
    rows_moved: int = 0           # record copies of the window's delete-by-move

    def __sub__(self, other: FFNCounters) -> FFNCounters:
        return FFNCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class FFNBackend(Protocol):
    """An FFN backend: owns the neuron records it computes from.

    ``__call__(layer, x, mask)``: x [T, d] f32 (already normalized) -> [T, d] f32; ``mask`` [T, d_ff]
    bool keeps, per token, the neurons that token computes (None: all). For one token the backend
    computes only the kept neurons; for several it may compute the union and zero the rest.
    """

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def start_token(self) -> None:
        """Called before each forward pass (a prefill counts as one step)."""

    def resident(self) -> dict[str, list]:
        """Every array the backend owns (numpy arrays or torch tensors), by owner (BACKEND_OWNERS),
        each storage span once."""

    def counters(self) -> FFNCounters: ...

    def cache_rows(self) -> list[int]:
        """Rows in use in each layer's window cache ([] for a backend without one)."""

    def close(self) -> None: ...


def arrays_of(obj) -> list[np.ndarray]:
    """The numpy arrays an object holds as attributes, each storage span once (views of another
    attribute's span are left out): a window's rows and bookkeeping, a kernel's scratch."""
    spans, out = set(), []
    for a in vars(obj).values():
        if isinstance(a, np.ndarray):
            key = (a.__array_interface__["data"][0], a.nbytes)
            if key not in spans:
                spans.add(key)
                out.append(a)
    return out


def array_bytes(arrays) -> int:
    """Bytes of numpy arrays and torch tensors (their data spans)."""
    return sum(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else a.nbytes for a in arrays)
