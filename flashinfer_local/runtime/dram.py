"""The all-in-DRAM FFN backends (``backend.FFNBackend``), and the record arithmetic every backend
shares (``RecordCompute``).

``DenseFFN`` holds an f16/f32 bundle's records as per-field matrices for BLAS; ``RecordFFN`` holds an
int8/int4 bundle's records as they are and computes on them with the numba kernels. The streaming
backends (``runtime.streaming``) compute on gathered records with the same ``RecordCompute``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from predictors.activation import gate_activation
from storage import format as fmt
from storage.quant import quantize_q8
from storage.reader import Bundle

from flashinfer_local.kernels import SMALL_T, QuantMatrix, RecordKernel
from flashinfer_local.models.common import linear
from flashinfer_local.runtime.backend import FFNCounters

CHUNK_ROWS = 1024          # records computed per prefill step: bounds the f32 scratch of one step

TORCH_DT = {"f16": torch.float16, "f32": torch.float32}
# RecordFFN moves the down columns into an int8 down matrix (see its docstring). False keeps whole
# records, so that the DRAM mode computes exactly what the streaming modes compute (tests use it).
SPLIT_DOWN = True


def splits_down(cfg, layout: fmt.RecordLayout) -> bool:
    """Whether ``RecordFFN`` moves this layout's down columns into an int8 down matrix."""
    return SPLIT_DOWN and layout.field("down").dtype in ("q8", "q5", "q4") and cfg.d_ff % 32 == 0


def selected_ids(mask: torch.Tensor) -> np.ndarray:
    """The neurons any token of mask [T, d_ff] selected, ascending."""
    return np.flatnonzero((mask[0] if mask.shape[0] == 1 else mask.any(0)).numpy())


def gate_array(gate: torch.Tensor | None) -> np.ndarray | None:
    """The gate values [T, d_ff] the kernel takes (None: the records hold the gate)."""
    return None if gate is None else gate.numpy()


def token_selection(mask: torch.Tensor | None, ids: np.ndarray) -> np.ndarray | None:
    """Which tokens need each of neurons ``ids``: mask [T, d_ff] -> [T, len(ids)] bool (None: all)."""
    return None if mask is None else np.ascontiguousarray(mask.numpy()[:, ids])


class RecordCompute:
    """The FFN of a set of records [m, record_bytes] (u8), accumulated into out [T, d].

    Up to SMALL_T tokens (decode, speculative verification) run the numba kernel in place, one
    layer as ``begin`` / ``activations`` / ``down`` / ``finish`` (``kernels.RecordKernel``: each
    token's values exactly what it would get alone). A prefill turns CHUNK_ROWS records at a time
    into f32 field matrices (a view for f16/f32, dequantization for int8/int4) and uses BLAS
    (``__call__``), so its scratch stays bounded whatever the number of records.
    """

    def __init__(self, bundle: Bundle):
        cfg, lay = bundle.config, bundle.layout
        self.gated, self.layout, self.act = cfg.gated, lay, gate_activation(cfg)
        self.kernel = RecordKernel(lay, bundle.ffn_dtype, cfg.d_model, cfg.d_ff, cfg.activation)
        self.tdt = TORCH_DT.get(bundle.ffn_dtype)             # None: quantized records
        if self.tdt is not None:
            item = np.dtype(fmt.DTYPES[bundle.ffn_dtype]).itemsize
            self.payload = lay.payload_bytes // item          # elements per record used
            self.cols = {f.name: slice(f.offset // item, f.offset // item + f.count) for f in lay.fields}
        self.vectors = lay.vectors                             # gate-split: up and down only
        self.names = self.vectors + ([] if cfg.gated else ["up_bias"])
        self.buf = ({} if self.tdt is not None else   # quantized: f32 matrices of one chunk, reused
                    {n: np.empty((CHUNK_ROWS, cfg.d_model), np.float32) for n in self.vectors})
        self.out = torch.zeros(1, cfg.d_model)      # a decode token's output, reused by the backends

    def arrays(self) -> list[np.ndarray]:
        """Its scratch: the kernel's, the prefill chunk's f32 matrices, the decode output row."""
        return self.kernel.scratch_arrays() + list(self.buf.values()) + [self.out]

    def output(self, T: int) -> torch.Tensor:
        """A zeroed output [T, d] (one token: the reused row)."""
        return self.out.zero_() if T == 1 else torch.zeros(T, self.out.shape[1])

    def _fields(self, part: np.ndarray, down: bool = True) -> dict[str, torch.Tensor]:
        """Records part [c, ...] as f32 field matrices (``down``: with the down columns; without,
        part may end before them)."""
        if self.tdt is not None:     # [c, payload] f32, contiguous; the fields are column slices of it
            r = torch.from_numpy(part).view(self.tdt)[:, :self.payload].float()
            return {n: r[:, self.cols[n]] for n in self.names}
        f = {n: torch.from_numpy(self.kernel.dequantize(part, n, self.buf[n]))
             for n in self.vectors if down or n != "down"}
        if not self.gated:
            f["up_bias"] = torch.from_numpy(fmt.field_values(part, self.layout, "up_bias"))
        return f

    def activations(self, x: torch.Tensor, part: np.ndarray | None = None, f: dict | None = None,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, d] -> the activations [T, c] of records part [c, ...] (or of its fields ``f``), by
        BLAS (a gate-split layout: from their gate values ``gate`` [T, c])."""
        f = f if f is not None else self._fields(part, down=False)
        if self.gated:
            g = F.linear(x, f["gate"]) if gate is None else gate
            return self.act(g) * F.linear(x, f["up"])
        return F.relu(F.linear(x, f["up"]) + f["up_bias"][:, 0])

    def __call__(self, x: torch.Tensor, recs: np.ndarray, out: torch.Tensor,
                 rows: np.ndarray | None = None, mask: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None, score: np.ndarray | None = None) -> None:
        """A prefill's out [T, d] += FFN of ``recs`` (or ``recs[rows]``, gathered a chunk at a
        time); ``mask`` [T, m] zeroes each token's unselected neurons; ``gate`` [T, m]: their gate
        values (gate-split layouts); ``score`` [m] (f32) += each record's |activation| summed over
        the tokens."""
        n = recs.shape[0] if rows is None else len(rows)
        for a in range(0, n, CHUNK_ROWS):
            part = recs[a:a + CHUNK_ROWS] if rows is None else recs[rows[a:a + CHUNK_ROWS]]
            f = self._fields(part)
            h = self.activations(x, f=f, gate=None if gate is None else gate[:, a:a + CHUNK_ROWS])
            if mask is not None:
                h = h * mask[:, a:a + CHUNK_ROWS]
            if score is not None:
                score[a:a + CHUNK_ROWS] += h.abs().sum(0).numpy()
            out.addmm_(h, f["down"])

    def whole(self, x: torch.Tensor, recs: np.ndarray, mask: torch.Tensor | None,
              gate: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN of one layer's records recs [d_ff, ...] for x [T, d] -> [T, d] (``gate``
        [T, d_ff]: the gate values of a gate-split layout)."""
        T = x.shape[0]
        out = self.output(T)
        if T > SMALL_T:
            self(x, recs, out, mask=mask, gate=gate)
            return out
        k = self.kernel
        ids = np.arange(recs.shape[0]) if mask is None else selected_ids(mask)
        sel = token_selection(mask, ids) if T > 1 else None
        k.begin(x.numpy(), gate_array(gate))
        k.activations(recs, ids, ids, sel)
        k.down(recs, ids, ids)
        k.finish(out.numpy())
        return out


class _InDRAM:
    """What the all-in-DRAM backends share: no reads, no cache, nothing to close."""

    def counters(self) -> FFNCounters:
        return FFNCounters()

    def cache_rows(self) -> list[int]:
        return []

    def start_token(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecordFFN(_InDRAM):
    """Every record of every layer held in DRAM as records (the all-in-memory mode for int8/int4
    bundles: computing on the quantized records is what makes them fast and small).

    Where d_ff is a multiple of 32, the down columns (q8, q5 or q4) move out of the records at load
    into a down matrix [d, d_ff] (int8, groups of 32 along d_ff: dequantized from the records and
    requantized, one more rounding of the down weights, 8-bit so small beside theirs), and
    decode computes the activations h from the gate/up part of the records and then down @ h as an
    int8 matrix-vector product on an int8 copy of h, as llama.cpp does. Measured on
    Qwen2.5-Coder-1.5B int4, this halves the FFN's compute: the per-record down axpy had to stay in
    float (each neuron's down column has its own scales).
    """

    def __init__(self, bundle: Bundle):
        cfg, lay = bundle.config, bundle.layout
        self.compute = RecordCompute(bundle)
        self.records, self.down = [], []
        split = splits_down(cfg, lay)
        down = lay.field("down")
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i)
            if split:
                self.down.append(_down_matrix(rec, self.compute.kernel))
                rec = np.ascontiguousarray(rec[:, :down.offset])            # the gate/up part
            self.records.append(rec)
        self.all_rows = np.arange(cfg.d_ff)

    def resident(self) -> dict[str, list]:
        qm = [a for m in self.down for a in (m.codes, m.scales16)]
        scratch = [a for m in self.down for a in m.scratch_arrays()]
        return {"ffn_dram": self.records + qm, "buffers": self.compute.arrays() + scratch}

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, d] -> [T, d]; mask [T, d_ff] or None; gate [T, d_ff]: a gate-split layout's gate values
        rec = self.records[layer]
        if not self.down:
            return self.compute.whole(x, rec, mask, gate)
        down, T = self.down[layer], x.shape[0]
        if T > SMALL_T:
            h = torch.cat([self.compute.activations(x, rec[a:a + CHUNK_ROWS],
                                                    gate=None if gate is None else gate[:, a:a + CHUNK_ROWS])
                           for a in range(0, rec.shape[0], CHUNK_ROWS)], dim=1)        # [T, d_ff]
            return down.matmul(h if mask is None else h * mask)
        k = self.compute.kernel                    # unselected neurons keep h = 0
        rows = self.all_rows if mask is None else selected_ids(mask)
        k.begin(x.numpy(), gate_array(gate))
        k.activations(rec, rows, rows, token_selection(mask, rows) if T > 1 else None)
        return down.matmul(torch.from_numpy(k.h[:T]))


def _down_matrix(rec: np.ndarray, kernel: RecordKernel, block: int = 1024) -> QuantMatrix:
    """The down columns of one layer's records [d_ff, record_bytes] as an int8 matrix [d, d_ff]
    (groups of 32 along d_ff), dequantized by the kernel ``block`` records at a time so that the
    f32 scratch stays a few MiB rather than the whole layer's down weights."""
    d_ff, d = rec.shape[0], kernel.d
    q, s = np.empty((d, d_ff), np.int8), np.empty((d, d_ff // 32), np.float16)
    buf = np.empty((min(block, d_ff), d), np.float32)
    for a in range(0, d_ff, block):
        b = min(d_ff, a + block)
        cols = kernel.dequantize(rec[a:b], "down", buf)                              # [b - a, d]
        q[:, a:b], s[:, a // 32:b // 32] = quantize_q8(np.ascontiguousarray(cols.T))
    return QuantMatrix(q, s)


def make_dram_ffn(bundle: Bundle):
    """The all-in-DRAM FFN backend for this bundle's record precision."""
    return (DenseFFN if bundle.ffn_dtype in fmt.DTYPES else RecordFFN)(bundle)


class DenseFFN(_InDRAM):
    """Every record of every layer held in DRAM, in the bundle's precision (the all-in-memory mode).

    Records are split once at load into contiguous per-field matrices in the orientation BLAS
    reads fastest (gate/up [d_ff, d], down [d, d_ff]): measured here, computing straight from the
    strided record fields was 15-25% slower per layer. Streaming modes compute on gathered records.
    """

    def __init__(self, bundle: Bundle):
        cfg = bundle.config
        self.gated, self.act = cfg.gated, gate_activation(cfg)
        self.gate, self.up, self.down, self.up_bias = [], [], [], []      # (gate-split: no gate here)
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i)                               # [d_ff, record_bytes] u8

            def field(name):
                return torch.from_numpy(bundle.field(rec, name))
            self.up.append(field("up").contiguous())                    # [d_ff, d]
            self.down.append(field("down").t().contiguous())            # [d, d_ff]
            if not self.gated:
                self.up_bias.append(field("up_bias")[:, 0].float())  # [d_ff]
            elif not bundle.gate_split:
                self.gate.append(field("gate").contiguous())            # [d_ff, d]

    def resident(self) -> dict[str, list]:
        return {"ffn_dram": self.gate + self.up + self.down + self.up_bias, "buffers": []}

    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None = None,
                 gate: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, d] -> [T, d]; mask [T, d_ff] or None; gate [T, d_ff]: a gate-split layout's gate values
        T = x.shape[0]
        if 1 < T <= SMALL_T:           # each token exactly as decode computes it
            return torch.cat([self(layer, x[t:t + 1], None if mask is None else mask[t:t + 1],
                                   None if gate is None else gate[t:t + 1]) for t in range(T)])
        if self.gated:
            g = linear(x, self.gate[layer]) if gate is None else gate
            h = self.act(g) * linear(x, self.up[layer])                           # [T, d_ff]
        else:
            h = F.relu(linear(x, self.up[layer], self.up_bias[layer]))
        if mask is not None:
            h = h * mask
        return linear(h, self.down[layer])
