"""Which FFN neurons a token needs: the one seam selectors and predictors plug into.

A selector maps a layer's FFN input x [T, d] to a per-token mask [T, d_ff] (``mask``; None: all
neurons; for a gate-split bundle the engine passes the gate values [T, d_ff] it computed, which the
threshold predictor scores with instead of computing them again), which the engine hands to the FFN
backend: each token computes exactly the neurons its
own selection keeps (that is also how quality is measured), and a streaming backend reads the union.
``select`` gives the sorted unique neuron ids any of the T tokens needs (the mask's union).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from predictors import calibration as cal
from predictors.activation import gate_activation
from predictors import store
from storage.convert import quantize_rows_q8
from storage.errors import FlashinferError, OptionError
from storage.reader import Bundle

from flashinfer_local.kernels import QuantMatrix
from flashinfer_local.models.common import by_token, linear, per_row
from flashinfer_local.runtime.budget import default_predictor
from flashinfer_local.runtime.options import SELECTORS


class AllSelector:
    """Every neuron: the exact model."""
    name = "all"
    nbytes = 0

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        return None

    def mask(self, layer: int, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor | None:
        return None


class OracleSelector:
    """MEASURING TOOL, not for users: computes each neuron's true activation from the dense FFN
    weights and keeps, per token, the (1 - sparsity) share of neurons with the largest |activation|
    (a multi-token pass reads the union and computes each token's own). It holds its own copy of the gate/up weights (f16), which
    is reported as ``nbytes`` and is not part of the engine's DRAM budget; its time counts as
    selection time. A baseline for what a perfect predictor would buy."""
    name = "oracle"

    def __init__(self, bundle: Bundle, sparsity: float):
        if not 0 <= sparsity < 1:
            raise OptionError("sparsity", f"{sparsity} must be in [0, 1)")
        cfg = bundle.config
        self.keep = max(1, round(cfg.d_ff * (1 - sparsity)))
        self.gated, self.act = cfg.gated, gate_activation(cfg)
        self.w = []   # per layer: (gate or None, up, up_bias or None), f16 [d_ff, d]
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i)
            get = lambda n: torch.from_numpy(bundle.vector_f32(i, rec, n).astype(np.float16))  # noqa: E731
            self.w.append((get("gate") if self.gated else None, get("up"),
                           None if self.gated else get("up_bias")[:, 0].float()))
        self.nbytes = sum(t.numel() * t.element_size() for ws in self.w for t in ws if t is not None)

    def _top(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if by_token(x.shape[0]):
            return per_row(lambda r: self._top(layer, r), x)
        gate, up, bias = self.w[layer]
        u = linear(x, up, bias)
        act = self.act(linear(x, gate)) * u if self.gated else F.relu(u)            # [T, d_ff]
        return torch.topk(act.abs(), self.keep, dim=-1).indices                     # [T, keep]

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        return np.unique(self._top(layer, x).numpy()).astype(np.int64)

    def mask(self, layer: int, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        top = self._top(layer, x)
        return torch.zeros(x.shape[0], self.w[layer][1].shape[0], dtype=torch.bool).scatter_(1, top, True)


class PredictorSelector:
    """What ``calibrate`` stored: per layer a score per neuron and a cutoff per sparsity; a token
    keeps the neurons whose score is above the layer's cutoff at ``sparsity``.

    threshold: score = |silu(gate . x)| from the gate rows (for ReLU models the activation from the
    up rows and bias), held here as int8 with an f16 scale per 32 values (half the bytes of f16; the
    codes' error, under 0.4% of a group's largest value, moves almost no neuron across a cutoff):
    d_ff x (d_model + d_model / 16) bytes per layer (f16 where d_model is not a multiple of 32).
    A gate-split bundle's dense gate matrices are those rows (``storage.format.gate_codes``): the
    selector holds no copy and scores with the gate values the engine computed.
    lowrank: the same score from a rank-r stand-in for the gate, g' = B (A x) + bias, with the stored
    f16 factors; small, and no weight rows needed.
    ``nbytes`` is what it holds (inside the DRAM budget); ``seconds`` the time spent scoring.
    """
    name = "predictor"

    def __init__(self, bundle: Bundle, kind: str | None = None, sparsity: float | None = None,
                 tensors: dict | None = None, meta: dict | None = None, shares: str = "auto"):
        cfg = bundle.config
        self.kind = kind = kind or default_predictor(bundle.path)
        if tensors is None:
            tensors, meta = store.load(bundle.path, kind, cfg, store.neuron_order(bundle.manifest),
                                       only=store.SELECTOR_TENSORS)
        self.meta, self.gated, self.bundle = meta, cfg.gated, bundle
        self.act = gate_activation(cfg)
        self.cutoff_table = [tensors[f"cutoffs.{i}"] for i in range(cfg.n_layers)]
        # per-layer shares of the sparsity (calibrate's lost mass per layer), where calibrated
        self.lost = (np.stack([tensors[f"lost.{i}"] for i in range(cfg.n_layers)])
                     if "lost.0" in tensors else None)
        self.shares = cal.shares_mode(self.lost, meta, shares)
        self.w = []
        for i in range(cfg.n_layers):
            if kind == "lowrank":
                self.w.append((torch.from_numpy(tensors[f"A.{i}"]), torch.from_numpy(tensors[f"B.{i}"]),
                               torch.from_numpy(tensors[f"bias.{i}"].astype(np.float32))))
                continue
            if bundle.gate_split:       # the dense gate, which the engine computes with (built if asked)
                self.w.append(None)
                continue
            rec = bundle.read_ffn_layer(i)
            a = bundle.field_f32(rec, "gate" if cfg.gated else "up")                  # [d_ff, d]
            rows = (QuantMatrix(*quantize_rows_q8(a)) if a.shape[1] % 32 == 0      # groups of 32
                    else torch.from_numpy(a.astype(np.float16)))
            bias = None if cfg.gated else torch.from_numpy(bundle.field_f32(rec, "up_bias")[:, 0].copy())
            self.w.append((rows, bias))
        self.nbytes = sum(t.nbytes if isinstance(t, QuantMatrix) else t.numel() * t.element_size()
                          for ws in self.w if ws is not None for t in ws if t is not None)
        self.seconds = 0.0
        default = meta["layer_default_sparsity"] if self.shares == "layer" else meta["default_sparsity"]
        self.set_sparsity(default if sparsity is None else sparsity)

    def set_sparsity(self, sparsity: float) -> None:
        """Keep (1 - sparsity) of the neurons on average: in every layer (uniform shares) or spread
        over the layers where the least activation mass is lost (``shares == "layer"``)."""
        if not 0 <= sparsity <= store.GRID[-1]:
            raise FlashinferError(f"--sparsity {sparsity} must be in [0, {store.GRID[-1]}]")
        self.sparsity = float(sparsity)
        self.layer_sparsity = cal.spread(self.lost, self.shares, sparsity, len(self.cutoff_table))
        self.cut = [float(np.interp(s, store.GRID, c)) for s, c in zip(self.layer_sparsity, self.cutoff_table)]

    def scores(self, layer: int, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        # x [T, d] f32 -> [T, d_ff] f32 (a few tokens: each row as alone, see models.common.by_token);
        # gate: a gate-split bundle's gate values, which the threshold scores are made of
        if self.kind == "lowrank":
            A, B, bias = self.w[layer]
            g = linear(linear(x, A), B) + bias
        elif gate is not None:
            g = gate
        else:
            if self.w[layer] is None:
                self.w[layer] = (dense_gate(self.bundle, layer), None)
            rows, bias = self.w[layer]
            g = linear(x, rows) if self.gated else linear(x, rows, bias)
        act = (lambda r: self.act(r).abs()) if self.gated else F.relu
        return per_row(act, g) if by_token(x.shape[0]) else act(g)

    def mask(self, layer: int, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        m = self.scores(layer, x, gate) > self.cut[layer]
        self.seconds += time.perf_counter() - t0
        return m

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        m = self.mask(layer, x)
        return np.flatnonzero(m.any(0).numpy()).astype(np.int64)


def dense_weight(bundle: Bundle, name: str):
    """Dense tensor ``name`` as the engine computes with it: a QuantMatrix over the mapped codes and
    scales of a quantized matrix, else the mapped tensor (zero-copy views either way)."""
    if name in bundle.quantized_dense:
        return QuantMatrix(bundle.dense(name), bundle.dense(name + ".scale"))
    return torch.from_numpy(bundle.dense(name))


def dense_gate(bundle: Bundle, layer: int):
    """A gate-split bundle's gate matrix of ``layer``."""
    return dense_weight(bundle, f"layers.{layer}.gate")


def make_selector(name: str, bundle: Bundle, sparsity: float | None = None, predictor: str | None = None,
                  shares: str = "auto"):
    if name == "all":
        return AllSelector()
    if name == "oracle":
        return OracleSelector(bundle, 0.5 if sparsity is None else sparsity)
    if name == "predictor":
        return PredictorSelector(bundle, predictor, sparsity, shares=shares)
    raise OptionError("selector", f"{name} is not known (choose {', '.join(SELECTORS)})")
