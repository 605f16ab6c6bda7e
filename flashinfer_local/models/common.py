"""Pieces every model family shares: norms, rotary embeddings, the KV cache, attention.

Model code only computes: weights arrive as a dict of torch tensors (canonical names from
``storage.format``), the FFN arrives as a callable, and position state is passed in explicitly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from storage.config import ModelConfig

from flashinfer_local.kernels import SMALL_T, QuantMatrix


UPCAST_BYTES = 8 << 20      # f32 weight scratch of one prefill matmul step (counted in the budget's slack)


def by_token(T: int) -> bool:
    """Whether a forward of T tokens runs each token as a one-token forward would: 2..SMALL_T tokens
    (a speculative verification, a short prompt). Reductions, transcendental functions and
    matrix products are then computed row by row or by kernels that treat each row alone, so the
    values do not depend on the batch (BLAS and vectorized torch kernels pick their summation
    order and vector tails by shape)."""
    return 1 < T <= SMALL_T


def per_row(fn, x: torch.Tensor) -> torch.Tensor:
    """fn applied to each row x[t:t + 1] of x [T, ...] separately -> the rows stacked."""
    return torch.cat([fn(x[t:t + 1]) for t in range(x.shape[0])])


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] (f32) @ w[out, in].T + b -> [T, out] f32, for f32 or f16 weights.

    f16 weights: one token (decode) runs torch's f16 matrix-vector kernel, which reads half the
    bytes (about 1.5-3x faster than f32 here); several tokens (prefill) upcast the weight for the
    call, since torch's f16 matrix-matrix path on AVX2 CPUs is slower than f32 and prefill is
    compute-bound anyway; the upcast goes UPCAST_BYTES of f32 weight at a time, so that a large
    matrix (a 150k-row head) never needs a full f32 copy inside the DRAM budget. Biases are f32.
    """
    if isinstance(w, QuantMatrix):            # int8 codes + group scales (int8/int4 bundles)
        y = w.matmul(x)
        return y if b is None else y + b
    if by_token(x.shape[0]):
        return per_row(lambda r: linear(r, w, b), x)
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    if x.shape[0] == 1:
        y = F.linear(x.to(w.dtype), w).float()
    else:
        rows = max(1, UPCAST_BYTES // (4 * w.shape[1]))
        y = torch.cat([F.linear(x, w[a:a + rows].float()) for a in range(0, w.shape[0], rows)], dim=-1)
    return y if b is None else y + b


def head_logits(x: torch.Tensor, head) -> torch.Tensor:
    """x [T, d] @ head.T -> logits [T, vocab] that the caller owns (a quantized head's decode
    output is that matrix's reused row, so it is copied: logits outlive the next token)."""
    y = linear(x, head)
    return y.clone() if isinstance(head, QuantMatrix) and x.shape[0] == 1 else y


def embed_rows(table, tokens: torch.Tensor) -> torch.Tensor:
    """Rows ``tokens`` [T] of an embedding table (a float tensor, or a QuantMatrix when an int8/int4
    bundle's tied embedding doubles as the head) -> [T, d] f32."""
    if isinstance(table, QuantMatrix):
        return table.rows(tokens)
    return table[tokens].float()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # x [T, d], w [d]
    if by_token(x.shape[0]):
        return per_row(lambda r: rms_norm(r, w, eps), x)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    if by_token(x.shape[0]):
        return per_row(lambda r: layer_norm(r, w, b, eps), x)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with linear or llama3 context scaling applied; ``local``: a
    local layer's (Gemma 3: ``rope_local_theta``, no scaling; ``ModelConfig.local_rope``)."""
    hd = cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if not s or local:
        return inv.float()
    if s["rope_type"] == "linear":
        return (inv / s["factor"]).float()
    if s["rope_type"] == "freq_factors":   # GGUF's rope_freqs: one divisor per frequency
        return (inv / torch.tensor(s["factors"], dtype=torch.float64)).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, ramp, scaled).float()


KV_DTYPES = {2: torch.float16, 4: torch.float32}


def kv_itemsize(ffn_dtype: str) -> int:
    """Bytes per key/value element: f32 for f32 bundles (the exact reference path), else f16."""
    return 4 if ffn_dtype == "f32" else 2

# a prefill's attention scores are computed this many bytes (f32) of [queries, keys] at a time
ATTN_BLOCK_BYTES = 4 << 20


# a local layer's ring holds this many keys past its window, so that a rollback of up to this many
# tokens (a speculative draft's rejected tail) still finds the keys the next query needs
RING_MARGIN = SMALL_T


def kv_slots(cfg: ModelConfig, layer: int, capacity: int) -> int:
    """Positions layer ``layer``'s cache holds at a context of ``capacity`` tokens: all of them, or
    for a local (sliding-window) layer its window and RING_MARGIN, as a ring."""
    w = cfg.window(layer)
    return capacity if w is None else min(capacity, w + RING_MARGIN)


def rope_kinds(cfg: ModelConfig) -> list[bool]:
    """The rotations a rope model's layers use (``local`` of ``rope_inv_freq``): one cos/sin table
    pair each."""
    return [] if cfg.learned_positions else sorted({cfg.local_rope(i) for i in range(cfg.n_layers)})


class KVCache:
    """Preallocated keys/values per layer position (``ModelConfig.stack``: a stored layer shared
    by several positions has a cache at each), sized by the position's key/value heads.

    k[l], v[l]: [n_kv_heads of l's layer, slots[l], head_dim], f16 (``itemsize`` 2) or f32 (4; f32
    bundles, compared with transformers). f16 halves the cache (56 KiB -> 28 KiB per token on
    Qwen2.5-1.5B), and rounding keys and values to f16 changed perplexity by -0.001% (SmolLM2 f16)
    and +0.005% (Qwen2.5-Coder-1.5B int4). Attention computes in f32 either way. A global layer
    holds position p in slot p; a local layer (sliding-window attention) holds its last
    ``kv_slots`` positions as a ring, position p in slot p % slots. Also holds the rotary tables
    [capacity, head_dim] f32 of each position (``rope[l]``: (cos, sin), shared by the layers of one base).
    """

    def __init__(self, cfg: ModelConfig, capacity: int, itemsize: int = 2):
        self.capacity = capacity
        dt = KV_DTYPES[itemsize]
        self.slots = [kv_slots(cfg, i, capacity) for i in cfg.stack]
        self.windows = [cfg.window(i) for i in cfg.stack]
        heads = [cfg.n_kv_heads[i] for i in cfg.stack]
        self.k = [torch.zeros(kv, n, cfg.head_dim, dtype=dt) for kv, n in zip(heads, self.slots)]
        self.v = [torch.zeros(kv, n, cfg.head_dim, dtype=dt) for kv, n in zip(heads, self.slots)]
        by_kind = {}
        for local in rope_kinds(cfg):
            freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), rope_inv_freq(cfg, local))
            emb = torch.cat([freqs, freqs], dim=-1)
            by_kind[local] = (emb.cos(), emb.sin())
        self.tables = [t for pair in by_kind.values() for t in pair]
        self.rope = [by_kind.get(cfg.local_rope(i)) for i in cfg.stack]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def ring(self, layer: int) -> bool:
        return self.slots[layer] < self.capacity

    def held(self, layer: int, n: int) -> int:
        """The first position layer ``layer`` still holds when the cache holds ``n`` tokens."""
        return max(0, n - self.slots[layer])

    def store(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values [KV, T, hd] of positions [pos, pos + T), rounded to the cache's dtype."""
        if not self.ring(layer):
            self.k[layer][:, pos:pos + k.shape[1]] = k
            self.v[layer][:, pos:pos + k.shape[1]] = v
            return
        n = self.slots[layer]
        T = k.shape[1]
        cut = max(0, T - n)                        # a ring keeps the last ``n`` of them
        idx = torch.arange(pos + cut, pos + T) % n
        self.k[layer][:, idx] = k[:, cut:].to(self.k[layer].dtype)
        self.v[layer][:, idx] = v[:, cut:].to(self.v[layer].dtype)

    def keys(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [lo, hi) as f32 [KV, hi - lo, hd], in position order."""
        if not self.ring(layer):
            return self.k[layer][:, lo:hi].float(), self.v[layer][:, lo:hi].float()
        idx = torch.arange(lo, hi) % self.slots[layer]
        return self.k[layer][:, idx].float(), self.v[layer][:, idx].float()

    def can_rewind(self, to: int, n: int) -> bool:
        """Whether a cache holding ``n`` tokens can continue from position ``to`` <= n: every local
        layer still holds the keys (to - window, to) that the query at ``to`` needs."""
        return not any(self.ring(i) and max(0, to - w + 1) < self.held(i, n) for i, w in enumerate(self.windows))

    def copy_from(self, other: KVCache, n: int) -> None:
        """The first ``n`` positions of ``other``'s keys and values (a session growing its cache;
        of a local layer, the ones it still holds)."""
        for i in range(len(self.k)):
            keep = torch.arange(max(other.held(i, n), self.held(i, n)), n)
            src, dst = keep % other.slots[i], keep % self.slots[i]
            self.k[i][:, dst] = other.k[i][:, src]
            self.v[i][:, dst] = other.v[i][:, src]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [heads, T, hd]; cos/sin [T, hd]; HF "rotate half" convention
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def _attend(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, G: int, scale: float) -> torch.Tensor:
    """One token's attention: q [H, 1, hd] against keys/values K, V [KV, S, hd] f32 -> [H * hd].
    Grouped-query attention without repeating K/V: query head h reads kv head h // G, so the G
    heads of a group form one [G, hd] block per kv head."""
    KV, hd = K.shape[0], K.shape[2]
    s = torch.bmm(q.reshape(KV, G, hd), K.transpose(1, 2)) * scale    # [KV, G, S]
    return torch.bmm(torch.softmax(s, dim=-1), V).reshape(-1)


def _head_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each head vector of x [heads, T, hd] (Gemma 3's query/key norms)."""
    if by_token(x.shape[1]):
        return torch.cat([_head_norm(x[:, t:t + 1], w, eps) for t in range(x.shape[1])], dim=1)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attention(cfg: ModelConfig, w: dict, p: str, layer: int, h: torch.Tensor, pos: int,
              cache: KVCache, at: int) -> torch.Tensor:
    """Self-attention of T new tokens at positions [pos, pos+T) against the cache. h [T, d] -> [T, d]:
    stored layer ``layer`` (weights under prefix ``p``) at layer position ``at`` (its cache).
    Up to SMALL_T tokens (``by_token``) the projections run for all of them at once (each row as
    alone) and each token attends exactly as a decode step at its position would. A local layer's
    query at position p sees the keys (p - window, p]."""
    T = h.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads[layer], cfg.head_dim
    q = linear(h, w[p + "q.weight"], w.get(p + "q.bias")).view(T, H, hd).transpose(0, 1)
    k = linear(h, w[p + "k.weight"], w.get(p + "k.bias")).view(T, KV, hd).transpose(0, 1)
    v = linear(h, w[p + "v.weight"], w.get(p + "v.bias")).view(T, KV, hd).transpose(0, 1)
    if cfg.qk_norm:
        q, k = _head_norm(q, w[p + "q_norm.weight"], cfg.norm_eps), _head_norm(k, w[p + "k_norm.weight"], cfg.norm_eps)
    if cache.rope[at] is not None:
        cos, sin = (t[pos:pos + T] for t in cache.rope[at])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    G, win = H // KV, cfg.window(layer)
    scale = cfg.attn_scale if cfg.attn_scale is not None else hd ** -0.5
    if T == 1 or by_token(T):
        cache.store(at, pos, k, v)             # rounded to the cache's dtype: the decode and prefill
        o = torch.empty(T, H * hd)             # paths both attend to the stored values
        for t in range(T):
            S = pos + t + 1
            K, V = cache.keys(at, 0 if win is None else max(0, S - win), S)
            o[t] = _attend(q[:, t:t + 1].contiguous(), K, V, G, scale)
    else:
        lo = 0 if win is None else max(0, pos - win + 1)
        if not cache.ring(at):
            cache.store(at, pos, k, v)
            K, V = cache.keys(at, lo, pos + T)
        else:                                  # the older keys are read before new ones overwrite their slots
            K0, V0 = cache.keys(at, lo, pos)
            cache.store(at, pos, k, v)
            dt = cache.k[at].dtype
            K, V = torch.cat([K0, k.to(dt).float()], dim=1), torch.cat([V0, v.to(dt).float()], dim=1)
        o = _prefill_attention(q, K, V, lo, pos, G, scale, win)
    return linear(o, w[p + "o.weight"], w.get(p + "o.bias"))


def attention_block_tokens(n_heads: int, keys: int) -> int:
    """Queries per block of a prefill's attention against ``keys`` keys: the scores [H, block,
    keys] f32 fit ATTN_BLOCK_BYTES."""
    return max(1, ATTN_BLOCK_BYTES // (4 * n_heads * keys))


def attention_scratch_bytes(cfg: ModelConfig, keys: int) -> int:
    """The most a prefill's attention holds at once: one block's scores and their softmax, and the
    keys and values of the widest layer as f32."""
    block = min(keys, attention_block_tokens(cfg.n_heads, keys))
    return 2 * 4 * cfg.n_heads * block * keys + 2 * 4 * max(cfg.n_kv_heads) * keys * cfg.head_dim


def _prefill_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, k0: int, pos: int, G: int,
                       scale: float, window: int | None) -> torch.Tensor:
    """A prefill's attention: q [H, T, hd] for positions [pos, pos + T) against keys/values K, V
    [KV, S, hd] f32 of positions [k0, pos + T) -> [T, H * hd], a block of queries at a time so the
    scores stay within ATTN_BLOCK_BYTES whatever the prompt's length (a 2048-token prompt's scores
    for Qwen2.5-1.5B at once were 200 MB, three times over with the mask and the softmax). The G
    heads of a kv group and a block's tokens form one [G * B, hd] matrix. Query p sees keys
    [0, p], or (p - window, p] in a local layer."""
    H, T, hd = q.shape
    KV = K.shape[0]
    o = torch.empty(T, H * hd)
    B = attention_block_tokens(H, K.shape[1])
    for a in range(0, T, B):
        b = min(T, a + B)
        n = b - a
        first = k0 if window is None else max(k0, pos + a - window + 1)    # this block's keys [first, pos + b)
        kp = torch.arange(first, pos + b)[None, :]
        qp = torch.arange(pos + a, pos + b)[:, None]
        mask = kp <= qp if window is None else (kp <= qp) & (kp > qp - window)
        Kb, Vb = K[:, first - k0:pos + b - k0], V[:, first - k0:pos + b - k0]
        qb = q[:, a:b].reshape(KV, G * n, hd)
        s = torch.bmm(qb, Kb.transpose(1, 2)).mul_(scale)                               # [KV, G*n, keys]
        keys = Kb.shape[1]
        s = s.view(KV, G, n, keys).masked_fill_(~mask, float("-inf")).view(KV, G * n, keys)
        ob = torch.bmm(torch.softmax(s, dim=-1), Vb)                                    # [KV, G*n, hd]
        o[a:b] = ob.view(H, n, hd).transpose(0, 1).reshape(n, H * hd)
    return o
