"""Which FFN neurons a token needs: the one seam selectors (and later, predictors) plug into.

A selector maps a layer's FFN input x [T, d] to sorted unique neuron ids (None: all of them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from storage.errors import FlashinferError
from storage.reader import Bundle

from .models.common import linear


class AllSelector:
    """Every neuron: the exact model."""
    name = "all"
    nbytes = 0

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        return None


class OracleSelector:
    """MEASURING TOOL, not for users: computes each neuron's true activation from the dense FFN
    weights and keeps, per token, the (1 - sparsity) share of neurons with the largest |activation|
    (union over the tokens of a prefill). It holds its own copy of the gate/up weights (f16), which
    is reported as ``nbytes`` and is not part of the engine's DRAM budget; its time counts as
    selection time. A baseline for what a perfect predictor would buy."""
    name = "oracle"

    def __init__(self, bundle: Bundle, sparsity: float):
        if not 0 <= sparsity < 1:
            raise FlashinferError(f"--sparsity {sparsity} must be in [0, 1)")
        cfg = bundle.config
        self.keep = max(1, round(cfg.d_ff * (1 - sparsity)))
        self.gated = cfg.gated
        self.w = []   # per layer: (gate or None, up, up_bias or None), f16 [d_ff, d]
        for i in range(cfg.n_layers):
            rec = bundle.read_ffn_layer(i)
            get = lambda n: torch.from_numpy(bundle.field_f32(rec, n).astype(np.float16))  # noqa: E731
            self.w.append((get("gate") if self.gated else None, get("up"),
                           None if self.gated else get("up_bias")[:, 0].float()))
        self.nbytes = sum(t.numel() * t.element_size() for ws in self.w for t in ws if t is not None)

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray | None:
        gate, up, bias = self.w[layer]
        u = linear(x, up, bias)
        act = F.silu(linear(x, gate)) * u if self.gated else F.relu(u)              # [T, d_ff]
        top = torch.topk(act.abs(), self.keep, dim=-1).indices                      # [T, keep]
        return np.unique(top.numpy()).astype(np.int64)


def make_selector(name: str, bundle: Bundle, sparsity: float = 0.5):
    if name == "all":
        return AllSelector()
    if name == "oracle":
        return OracleSelector(bundle, sparsity)
    raise FlashinferError(f"--selector {name} is not known (choose all or oracle)")
