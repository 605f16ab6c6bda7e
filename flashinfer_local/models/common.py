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


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with linear or llama3 context scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if not s:
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


class KVCache:
    """Preallocated keys/values, sized per layer by that layer's key/value heads.

    k[l], v[l]: [n_kv_heads[l], capacity, head_dim], f16 (``itemsize`` 2) or f32 (4; f32
    bundles, compared with transformers). f16 halves the cache (56 KiB -> 28 KiB per token on
    Qwen2.5-1.5B), and rounding keys and values to f16 changed perplexity by -0.001% (SmolLM2 f16)
    and +0.005% (Qwen2.5-Coder-1.5B int4). Attention computes in f32 either way. Also holds the
    rotary tables cos/sin [capacity, head_dim] f32 for rope models.
    """

    def __init__(self, cfg: ModelConfig, capacity: int, itemsize: int = 2):
        self.capacity = capacity
        dt = KV_DTYPES[itemsize]
        self.k = [torch.zeros(kv, capacity, cfg.head_dim, dtype=dt) for kv in cfg.n_kv_heads]
        self.v = [torch.zeros(kv, capacity, cfg.head_dim, dtype=dt) for kv in cfg.n_kv_heads]
        self.cos = self.sin = None
        if not cfg.learned_positions:
            freqs = torch.outer(torch.arange(capacity, dtype=torch.float32), rope_inv_freq(cfg))
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_from(self, other: KVCache, n: int) -> None:
        """The first ``n`` positions of ``other``'s keys and values (a session growing its cache)."""
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :n] = src[:, :n]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [heads, T, hd]; cos/sin [T, hd]; HF "rotate half" convention
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def _attend(q: torch.Tensor, cache: KVCache, layer: int, S: int, G: int) -> torch.Tensor:
    """One token's attention: q [H, 1, hd] against the first S cached keys/values -> [H * hd].
    Grouped-query attention without repeating K/V: query head h reads kv head h // G, so the G
    heads of a group form one [G, hd] block per kv head."""
    K, V = cache.k[layer][:, :S].float(), cache.v[layer][:, :S].float()      # [KV, S, hd]
    KV, hd = K.shape[0], K.shape[2]
    s = torch.bmm(q.reshape(KV, G, hd), K.transpose(1, 2)) * hd ** -0.5   # [KV, G, S]
    return torch.bmm(torch.softmax(s, dim=-1), V).reshape(-1)


def attention(cfg: ModelConfig, w: dict, p: str, layer: int, h: torch.Tensor, pos: int,
              cache: KVCache) -> torch.Tensor:
    """Self-attention of T new tokens at positions [pos, pos+T) against the cache. h [T, d] -> [T, d].
    Up to SMALL_T tokens (``by_token``) the projections run for all of them at once (each row as
    alone) and each token attends exactly as a decode step at its position would."""
    T = h.shape[0]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads[layer], cfg.head_dim
    q = linear(h, w[p + "q.weight"], w.get(p + "q.bias")).view(T, H, hd).transpose(0, 1)
    k = linear(h, w[p + "k.weight"], w.get(p + "k.bias")).view(T, KV, hd).transpose(0, 1)
    v = linear(h, w[p + "v.weight"], w.get(p + "v.bias")).view(T, KV, hd).transpose(0, 1)
    if cache.cos is not None:
        cos, sin = cache.cos[pos:pos + T], cache.sin[pos:pos + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache.k[layer][:, pos:pos + T] = k            # rounded to the cache's dtype: the decode and
    cache.v[layer][:, pos:pos + T] = v            # prefill paths both attend to the stored values
    G = H // KV
    if T == 1 or by_token(T):
        o = torch.empty(T, H * hd)
        for t in range(T):
            o[t] = _attend(q[:, t:t + 1].contiguous(), cache, layer, pos + t + 1, G)
    else:
        o = _prefill_attention(q, cache, layer, pos, G)
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


def _prefill_attention(q: torch.Tensor, cache: KVCache, layer: int, pos: int, G: int) -> torch.Tensor:
    """A prefill's attention: q [H, T, hd] for positions [pos, pos + T) -> [T, H * hd], a block of
    queries at a time so the scores stay within ATTN_BLOCK_BYTES whatever the prompt's length
    (a 2048-token prompt's scores for Qwen2.5-1.5B at once were 200 MB, three times over with the
    mask and the softmax). The G heads of a kv group and a block's tokens form one [G * B, hd] matrix."""
    H, T, hd = q.shape
    S = pos + T
    K, V = cache.k[layer][:, :S].float(), cache.v[layer][:, :S].float()             # [KV, S, hd]
    KV = K.shape[0]
    o = torch.empty(T, H * hd)
    B = attention_block_tokens(H, S)
    for a in range(0, T, B):
        b = min(T, a + B)
        n, keys = b - a, pos + b                       # this block's queries see keys [0, pos + b)
        qb = q[:, a:b].reshape(KV, G * n, hd)
        s = torch.bmm(qb, K[:, :keys].transpose(1, 2)).mul_(hd ** -0.5)             # [KV, G*n, keys]
        mask = torch.ones(n, keys, dtype=torch.bool).tril(diagonal=pos + a)          # query t sees [0, pos + t]
        s = s.view(KV, G, n, keys).masked_fill_(~mask, float("-inf")).view(KV, G * n, keys)
        ob = torch.bmm(torch.softmax(s, dim=-1), V[:, :keys])                         # [KV, G*n, hd]
        o[a:b] = ob.view(H, n, hd).transpose(0, 1).reshape(n, H * hd)
    return o
