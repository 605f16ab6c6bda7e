"""The low-rank predictor (the flash paper's, extended to SwiGLU): per layer a rank-r stand-in for the
gate (ReLU models: the up projection), g' = B (A x) + bias, from which the score is computed as the
exact gate would give it: |silu(g')| (ReLU: relu(g')). A token keeps the neurons whose score is above
the layer's cutoff, the same rule as the threshold predictor, without holding the gate rows.

Training (``fit``) per layer, on recorded FFN inputs x and their true activations a:
1. Closed form: the rank-r factors minimizing E ||W x - B A x||^2 over the calibration inputs (a
   truncated SVD of W C^(1/2), C the inputs' second moment). One SVD serves every rank. Measured on
   SmolLM2: at rank 128 it keeps 0.72 of the active mass where factors trained from scratch on the
   same tokens kept 0.60 (a few thousand tokens overfit a million parameters).
2. Ranks are tried smallest first; the first whose held-out recall (share of the active neurons'
   activation mass kept at the target sparsity) reaches the target is kept; when none does, the
   best one tried (the largest) is kept and the report says so. Ranks stop at ``max_rank``, where the
   factors would take a quarter of the bytes of the rows they stand in for.
3. Fine-tuning of the chosen factors on a weighted binary cross-entropy, sigma((score - cutoff) / tau)
   against "active": positives weigh neg/pos more (rare at high sparsity and in ReLU models) and more
   again for large |a| (missing a large activation costs more); the epoch (0 being the closed form)
   with the best held-out recall is kept, so fine-tuning never makes a layer worse on held-out tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .activation import act_fn
from .calibration import cutoff_table, selection_quality
from .store import grid_index

RANKS = (32, 64, 128, 256, 512)
EPOCHS = 2
BATCH = 256
LR = 1e-3
POS_WEIGHT_MAX = 50.0
MAGNITUDE_MAX = 4.0
RIDGE = 1e-4          # of the mean input power, added to C's diagonal


@dataclass
class LowRank:
    A: torch.Tensor        # [r, d] f32
    B: torch.Tensor        # [d_ff, r] f32
    bias: torch.Tensor     # [d_ff] f32
    act: str = "silu"      # the model's activation (relu: a ReLU model's up row)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, d] -> [N, d_ff]
        g = (x @ self.A.T) @ self.B.T + self.bias
        return F.relu(g) if self.act == "relu" else act_fn(self.act)(g).abs()


def max_rank(d: int, d_ff: int) -> int:
    """Largest rank tried: factors at most a quarter the size of the rows they stand in for (a twelfth
    of the FFN), so the predictor leaves most of a tight budget to the window cache."""
    return max(1, d * d_ff // (4 * (d + d_ff)))


class DataAwareSVD:
    """SVD of W C^(1/2): the best rank-r B A (any r) for inputs with second moment C."""

    def __init__(self, w: torch.Tensor, x: torch.Tensor):
        c = (x.T.double() @ x.double()) / x.shape[0]
        c += RIDGE * float(c.trace()) / c.shape[0] * torch.eye(c.shape[0], dtype=torch.float64)
        lam, q = torch.linalg.eigh(c)
        lam = lam.clamp_min(1e-12)
        self.c_inv_half = (q / lam.sqrt()) @ q.T
        self.u, self.s, self.vh = torch.linalg.svd(w.double() @ ((q * lam.sqrt()) @ q.T), full_matrices=False)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d], B [d_ff, r]) f32."""
        return ((self.vh[:rank] @ self.c_inv_half).float().contiguous(),
                (self.u[:, :rank] * self.s[:rank]).float().contiguous())


def _quality(m: LowRank, x, x_val, abs_a_val, thr, k, seed):
    with torch.no_grad():
        cut = cutoff_table(m.scores(x), seed)
        return cut, selection_quality(m.scores(x_val), float(cut[k]), abs_a_val, thr)


def fine_tune(m: LowRank, x: torch.Tensor, abs_a: torch.Tensor, thr: float, x_val: torch.Tensor,
              abs_a_val: torch.Tensor, sparsity: float, seed: int, epochs: int = EPOCHS):
    """(predictor, cutoffs, held-out quality, best epoch) after weighted-BCE fine-tuning (see above)."""
    k = grid_index(sparsity)
    cut, q = _quality(m, x, x_val, abs_a_val, thr, k, seed)
    best = (m, cut, q, 0)
    if epochs == 0:
        return best
    centre = float(cut[k])
    with torch.no_grad():
        tau = max(float(m.scores(x[:1024]).std()), 1e-6)
    y = (abs_a > thr).float()
    pos = float(y.mean())
    pos_weight = min(POS_WEIGHT_MAX, (1 - pos) / pos) if 0 < pos < 1 else 1.0
    scale = thr if thr > 0 else (float(abs_a[abs_a > 0].mean()) if pos > 0 else 1.0)
    weight = torch.where(y > 0, pos_weight * (abs_a / scale).clamp(1.0, MAGNITUDE_MAX), torch.ones_like(y))
    cur = LowRank(m.A.clone().requires_grad_(), m.B.clone().requires_grad_(),
                  m.bias.clone().requires_grad_(), m.act)
    opt = torch.optim.Adam([cur.A, cur.B, cur.bias], lr=LR)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(x.shape[0], generator=g)
            for s in range(0, x.shape[0], BATCH):
                i = perm[s:s + BATCH]
                z = (cur.scores(x[i]) - centre) / tau
                loss = F.binary_cross_entropy_with_logits(z, y[i], weight=weight[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            snap = LowRank(cur.A.detach().clone(), cur.B.detach().clone(), cur.bias.detach().clone(), m.act)
            cut, q = _quality(snap, x, x_val, abs_a_val, thr, k, seed)
            if q["recall"] > best[2]["recall"]:
                best = (snap, cut, q, epoch)
    return best


def fit(x: torch.Tensor, abs_a: torch.Tensor, x_val: torch.Tensor, abs_a_val: torch.Tensor, thr: float,
        sparsity: float, w: torch.Tensor, b: torch.Tensor | None, recall_target: float, seed: int,
        ranks: tuple[int, ...] = RANKS, epochs: int = EPOCHS, act: str = "silu") -> tuple[LowRank, np.ndarray, dict]:
    """The layer's predictor: (predictor, cutoffs [len(GRID)], report). w [d_ff, d] is the gate (ReLU:
    up) matrix, b its bias or None (``act`` then "relu"); the cutoffs are the score's quantiles on the
    training tokens."""
    cap = max_rank(w.shape[1], w.shape[0])
    ranks = tuple(r for r in ranks if r <= cap) or (cap,)
    k = grid_index(sparsity)
    svd = DataAwareSVD(w, x)
    bias = torch.zeros(w.shape[0]) if b is None else b.float().clone()
    tried, best = [], None
    for r in ranks:
        m = LowRank(*svd.factors(r), bias, act)
        cut, q = _quality(m, x, x_val, abs_a_val, thr, k, seed)
        tried.append({"rank": r, "recall": q["recall"], "precision": q["precision"]})
        if best is None or q["recall"] > best[1]["recall"]:
            best = (m, q)
        if q["recall"] >= recall_target:
            break
    t0 = time.perf_counter()
    m, cut, q, epoch = fine_tune(best[0], x, abs_a, thr, x_val, abs_a_val, sparsity, seed, epochs)
    return m, cut, {**q, "rank": m.rank, "reached": q["recall"] >= recall_target, "tried": tried,
                    "fine_tune_epoch": epoch, "closed_form_recall": best[1]["recall"],
                    "fine_tune_s": time.perf_counter() - t0}
