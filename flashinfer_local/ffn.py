"""FFN backends: compute a layer's feed-forward output from its neuron records.

The model calls ``ffn(layer, x)`` with x [T, d] (already normalized) and gets [T, d] back. A backend
owns the records it computes from; this is the seam where streaming backends (records read from the
SSD into a window cache) plug in without touching model code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from storage.reader import Bundle

from .models.common import linear


class DenseFFN:
    """Every record of every layer held in DRAM, in the bundle's precision (the all-in-memory mode).

    Records are split once at load into contiguous per-field matrices in the orientation BLAS
    reads fastest (gate/up [d_ff, d], down [d, d_ff]): measured here, computing straight from the
    strided record fields was 15-25% slower per layer. Streaming modes compute on gathered records.
    """

    def __init__(self, bundle: Bundle):
        cfg = bundle.config
        self.gated = cfg.gated
        self.gate, self.up, self.down, self.up_bias = [], [], [], []
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i)                               # [d_ff, record_bytes] u8

            def field(name):
                return torch.from_numpy(bundle.field(rec, name))
            self.up.append(field("up").contiguous())                    # [d_ff, d]
            self.down.append(field("down").t().contiguous())            # [d, d_ff]
            if self.gated:
                self.gate.append(field("gate").contiguous())            # [d_ff, d]
            else:
                self.up_bias.append(field("up_bias")[:, 0].float())  # [d_ff]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gate + self.up + self.down + self.up_bias)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        # x [T, d] -> [T, d]
        if self.gated:
            h = F.silu(linear(x, self.gate[layer])) * linear(x, self.up[layer])   # [T, d_ff]
        else:
            h = F.relu(linear(x, self.up[layer], self.up_bias[layer]))
        return linear(h, self.down[layer])
