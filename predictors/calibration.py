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

from .activation import act_fn
from .store import GRID, KEEP_GRID

QUANTILE_SAMPLE = 1 << 23    # (token, neuron) values a quantile is taken from at most
COACT_TOKENS = 512           # tokens co-activation is counted over
COACT_NEIGHBOURS = 16        # most co-active neighbours stored per neuron


def activations(x: torch.Tensor, w: dict[str, torch.Tensor], act: str) -> torch.Tensor:
    """True activations a [N, d_ff] of FFN inputs x [N, d] (f32) and the layer's f32 fields
    (gate/up [d_ff, d]; up_bias [d_ff] for ReLU models); ``act`` the model's activation."""
    if act != "relu":
        return act_fn(act)(x @ w["gate"].T) * (x @ w["up"].T)
    return F.relu(x @ w["up"].T + w["up_bias"])


def gate_scores(x: torch.Tensor, w: dict[str, torch.Tensor], act: str) -> torch.Tensor:
    """The threshold predictor's score [N, d_ff]: |act(gate . x)| (computed exactly from the gate
    rows, CATS-style), or for ReLU models the activation itself (0 where it is zero)."""
    if act != "relu":
        return act_fn(act)(x @ w["gate"].T).abs()
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


def keep_frequencies(score: torch.Tensor, cutoffs: np.ndarray) -> np.ndarray:
    """keep [len(KEEP_GRID), d_ff] (f16): share of tokens on which the run-time selector keeps each
    neuron (score above the layer's cutoff) at each sparsity of KEEP_GRID: what placement plans with."""
    cut = np.interp(KEEP_GRID, GRID, cutoffs)
    return np.stack([(score > float(c)).float().mean(0).numpy() for c in cut]).astype(np.float16)


def window_statistics(score: torch.Tensor, cutoffs: np.ndarray, window: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(reads, occupancy), each [len(KEEP_GRID), d_ff] (f16), of each neuron in a recency window of
    ``k`` tokens at each sparsity of KEEP_GRID, over scores [N, d_ff] of consecutive tokens in runs
    of ``window`` (the calibration windows): reads = share of tokens that keep the neuron while none
    of the k - 1 before did (a window miss); occupancy = share of tokens on which one of the last k
    kept it (the window holds a row for it). What placement weighs a window row with: activations
    come in runs, so these beat what the keep frequency alone predicts."""
    cut = np.interp(KEEP_GRID, GRID, cutoffs)
    reads = np.zeros((len(cut), score.shape[1]), np.float64)
    occ = np.zeros_like(reads)
    for a in range(0, score.shape[0], window):
        s = score[a:a + window]
        for j, c in enumerate(cut):
            m = s > float(c)
            recent = torch.zeros_like(m)
            for d in range(1, k):
                recent[d:] |= m[:-d]
            reads[j] += (m & ~recent).sum(0).numpy()
            occ[j] += (m | recent).sum(0).numpy()
    n = max(1, score.shape[0])
    return (reads / n).astype(np.float16), (occ / n).astype(np.float16)


def coactivation(kept: torch.Tensor, k: int = COACT_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Each neuron's ``k`` most co-active neighbours from kept [N, d_ff] (bool, the selector's mask
    over N tokens): (ids int32 [d_ff, k], weights f16 [d_ff, k]), strongest first, the weight the
    Jaccard index |both| / |either| (0 for a neuron never kept)."""
    m = kept.float()
    both = m.T @ m                                                       # [d_ff, d_ff]
    n = torch.diagonal(both).clone()
    jac = both / (n[:, None] + n[None, :] - both).clamp_min(1.0)
    jac.fill_diagonal_(-1.0)
    w, ids = torch.topk(jac, min(k, m.shape[1] - 1), dim=1)
    return ids.numpy().astype(np.int32), w.clamp_min(0).numpy().astype(np.float16)


def mass_lost(score: torch.Tensor, abs_a: torch.Tensor, cutoffs: np.ndarray) -> np.ndarray:
    """lost [len(KEEP_GRID)] (f32): share of the activation mass sum |a| on these (validation)
    tokens that the neurons the selector drops at each sparsity of KEEP_GRID carry: the loss
    ``layer_sparsities`` spends."""
    total = float(abs_a.sum()) or 1.0
    cut = np.interp(KEEP_GRID, GRID, cutoffs)
    return np.array([float((abs_a * (score <= float(c))).sum()) / total for c in cut], np.float32)


def layer_sparsities(lost: np.ndarray, target: float) -> np.ndarray:
    """Per-layer sparsities (of KEEP_GRID) whose mean reaches ``target`` with the least total lost
    mass: from all layers at 0, a step of 0.05 at a time to the layer whose loss grows least
    (optimal for convex loss curves); lost [n_layers, len(KEEP_GRID)]."""
    L, G = lost.shape
    idx = np.zeros(L, np.int64)
    need = int(np.ceil(target * L / (KEEP_GRID[1] - KEEP_GRID[0]) - 1e-6))    # steps in all
    for _ in range(min(need, L * (G - 1))):
        inc = np.where(idx < G - 1, lost[np.arange(L), np.minimum(idx + 1, G - 1)] - lost[np.arange(L), idx], np.inf)
        idx[int(np.argmin(inc))] += 1
    return KEEP_GRID[idx].astype(np.float64)


def shares_mode(lost: np.ndarray | None, meta: dict, shares: str) -> str:
    """"layer" when ``shares`` is auto and the predictor was calibrated with per-layer shares."""
    return "layer" if shares == "auto" and lost is not None and "layer_default_sparsity" in meta else "uniform"


def spread(lost: np.ndarray | None, mode: str, sparsity: float, n_layers: int) -> list[float]:
    """Each layer's sparsity for a mean of ``sparsity``: the same in every layer, or (mode "layer")
    the least-loss shares of ``layer_sparsities``."""
    if mode == "layer" and lost is not None:
        return [float(v) for v in layer_sparsities(lost, sparsity)]
    return [float(sparsity)] * n_layers


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
