"""Per-layer calibration statistics from recorded FFN inputs: true activations, thresholds, score
quantiles, activation frequencies and how well a score picks the neurons that matter.

Terms used throughout (per layer, over calibration tokens):
- a [N, d_ff]: the true activation act(gate . x) * (up . x) (SwiGLU) or relu(up . x + b) (ReLU), the
  factor each neuron's down column is scaled by; |a| says how much a neuron matters to a token.
- threshold at sparsity s: the s-quantile of |a| over all (token, neuron) pairs; a neuron is *active*
  on a token when |a| is above it (for ReLU models the natural threshold is 0: active = non-zero).
- score: what a predictor computes per neuron; a token keeps neuron j when score_j > cutoff(s), the
  s-quantile of the score, so every predictor is driven by the same sparsity knob.
- recall: share of the active neurons' activation mass sum |a| that the kept set holds;
  precision: share of kept neurons that are active.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .store import GRID

QUANTILE_SAMPLE = 1 << 23    # (token, neuron) values a quantile is taken from at most


def activations(x: torch.Tensor, w: dict[str, torch.Tensor], gated: bool) -> torch.Tensor:
    """True activations a [N, d_ff] of FFN inputs x [N, d] (f32) and the layer's f32 fields
    (gate/up [d_ff, d]; up_bias [d_ff] for ReLU models)."""
    if gated:
        return F.silu(x @ w["gate"].T) * (x @ w["up"].T)
    return F.relu(x @ w["up"].T + w["up_bias"])


def gate_scores(x: torch.Tensor, w: dict[str, torch.Tensor], gated: bool) -> torch.Tensor:
    """The threshold predictor's score [N, d_ff]: |silu(gate . x)| (computed exactly from the gate
    rows, CATS-style), or for ReLU models the activation itself (0 where it is zero)."""
    if gated:
        return F.silu(x @ w["gate"].T).abs()
    return F.relu(x @ w["up"].T + w["up_bias"])


def _sample(v: torch.Tensor, seed: int) -> torch.Tensor:
    flat = v.reshape(-1)
    if flat.numel() <= QUANTILE_SAMPLE:
        return flat
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=g)]


def quantiles(v: torch.Tensor, qs: np.ndarray, seed: int = 0) -> np.ndarray:
    """Quantiles of all values of v at each q of qs (from a fixed random sample when v is large)."""
    s = torch.sort(_sample(v, seed).float()).values
    idx = np.clip(np.round(np.asarray(qs) * (s.numel() - 1)).astype(np.int64), 0, s.numel() - 1)
    return s[torch.from_numpy(idx)].numpy().astype(np.float32)


def cutoff_table(score: torch.Tensor, seed: int = 0) -> np.ndarray:
    """cutoffs [len(GRID)]: the score's quantile at each stored sparsity."""
    return quantiles(score, GRID, seed)


def threshold(abs_a: torch.Tensor, sparsity: float, gated: bool, seed: int = 0) -> float:
    """|a| above which a neuron counts as active at ``sparsity`` (ReLU: 0, the natural zeros)."""
    if not gated:
        return 0.0
    return float(quantiles(abs_a, np.array([sparsity]), seed)[0])


def frequencies(abs_a: torch.Tensor, thr: float) -> np.ndarray:
    """freq [d_ff]: share of tokens on which each neuron is active."""
    return (abs_a > thr).float().mean(0).numpy().astype(np.float32)


def natural_sparsity(abs_a: torch.Tensor) -> float:
    """Share of exact zeros (a ReLU model's own sparsity)."""
    return float((abs_a == 0).float().mean())


def selection_quality(score: torch.Tensor, cutoff: float, abs_a: torch.Tensor, thr: float) -> dict:
    """How the kept set {score > cutoff} matches the active set {|a| > thr} on these tokens."""
    kept, active = score > cutoff, abs_a > thr
    mass = (abs_a * active).sum()
    hit = (kept & active)
    return {"recall": float((abs_a * hit).sum() / mass) if mass > 0 else 1.0,
            "precision": float(hit.sum() / kept.sum()) if kept.any() else 1.0,
            "kept": float(kept.float().mean()), "active": float(active.float().mean())}
