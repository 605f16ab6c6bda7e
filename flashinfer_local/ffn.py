"""FFN backends: compute a layer's feed-forward output from its neuron records.

The model calls ``ffn(layer, x)`` with x [T, d] (already normalized) and gets [T, d] back. A backend
owns the records it computes from; this is the seam where streaming backends (records read from the
SSD into a window cache) plug in without touching model code.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from storage import format as fmt
from storage.reader import Bundle


class DenseFFN:
    """Every record of every layer held in DRAM as float32 (the all-in-memory mode).

    Per layer one matrix W [d_ff, record_bytes / itemsize] in record layout: neuron i is row i and the
    gate/up/down fields are column slices of it (strided views, no copies: BLAS reads them with a
    leading dimension of the record length).
    """

    def __init__(self, bundle: Bundle):
        cfg, lay = bundle.config, bundle.layout
        self.gated = cfg.gated
        item = np.dtype(fmt.DTYPES[bundle.ffn_dtype]).itemsize
        # f32 record columns covering each field: [start, stop)
        self.cols = {f.name: (f.offset // item, f.offset // item + f.count) for f in lay.fields}
        self.layers: list[torch.Tensor] = []
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i).view(fmt.DTYPES[bundle.ffn_dtype])  # [d_ff, R/item]
            self.layers.append(torch.from_numpy(rec.astype(np.float32, copy=False)))

    def _field(self, layer: int, name: str) -> torch.Tensor:
        a, b = self.cols[name]
        return self.layers[layer][:, a:b]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        # x [T, d] -> [T, d]
        up = F.linear(x, self._field(layer, "up"))                    # [T, d_ff]
        if self.gated:
            h = F.silu(F.linear(x, self._field(layer, "gate"))) * up
        else:
            h = F.relu(up + self._field(layer, "up_bias")[:, 0])
        return h @ self._field(layer, "down")                          # [T, d]
