"""The DRAM budget: every byte the engine will hold for a model, planned before anything is loaded.

This module is the one owner of the budget. ``plan_budget`` chooses the mode (every FFN record in
DRAM, a window cache over the SSD, or naive reads) and splits the budget between owners:

    dense      dense.safetensors, memory-mapped (attention and the head are touched whole every
               token; an untied embedding only in the rows ``context`` lookups can touch)
    ffn_dram   every FFN record in DRAM (mode none), as the DRAM backend lays it out
    window     the window caches' record rows and bookkeeping (mode window: whatever is left)
    buffers    read scratch and compute scratch of the backend (and a prefill chunk in flight)
    kv_cache   keys and values per layer at ``context`` tokens, and the rotary tables
    selector   a sparsity predictor's weights (the oracle, a measuring tool, is held outside)
    tokenizer  the loaded tokenizer (estimated from its file)
    slack      a prefill chunk's activations (``prefill_scratch_bytes``), logits, and a measured
               allowance for the allocator and small per-token arrays (``ALLOCATOR_SLACK_BYTES``)

Each size is computed from the same facts the allocating code uses (the window cache's metadata
from ``storage.window_cache``, the KV cache's shape, the backends' scratch), and ``estimate`` calls
these functions with sizes computed from a config alone. A budget that cannot hold the fixed part
is refused with the minimum that would work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from predictors import store
from storage import format as fmt
from storage import window_cache as wc
from storage.config import ModelConfig
from storage.errors import FlashinferError
from storage.reader import Bundle

from flashinfer_local.kernels import QuantMatrix, RecordKernel
from flashinfer_local.models.common import UPCAST_BYTES, attention_scratch_bytes, kv_itemsize, kv_slots, rope_kinds
from flashinfer_local.runtime.dram import CHUNK_ROWS, splits_down
from flashinfer_local.units import fmt_bytes

SCRATCH_BUFFERS = 2        # overflow/naive reads: one chunk read while the previous is computed
PAGE = 4096
# The tokenizer's peak RSS per byte of its tokenizer.json: the lean BPE (``runtime.bpe``) peaks at
# 3.8x Qwen2.5's 5.1 MiB file, 4.3x SmolLM2's 1.5 MiB one and 3.4x Gemma 3's 13.6 MiB SentencePiece
# one while it loads (then holds 1.8-2.3x); HF `tokenizers`, for the files the lean one does not
# reproduce, held 21-22x (106 MiB for Qwen2.5's, 278 MiB for Gemma's, peaking at 406 MiB).
TOKENIZER_RSS_PER_FILE_BYTE = {"lean": 5, "tokenizers": 24}
# Freed-but-kept heap, Python objects and small per-token arrays beyond what a prefill chunk's
# activations account for: with 32 MiB here, a 2048-token prompt at the minimum budget peaked up to
# 14 MiB above the plan (Qwen2.5-Coder-0.5B int8; README, Benchmarks), so 48 MiB.
ALLOCATOR_SLACK_BYTES = 48 << 20
PREFILL_TOKENS = 256       # a longer prompt runs in chunks of at most this many tokens
OFFLOAD_MODES = ("none", "window", "naive")
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Sizes:
    """What the plan needs to know of a bundle: from an open Bundle (``of``) or, before anything
    is converted, from a config and the sizes ``convert`` would write (``measure.estimate``)."""
    cfg: ModelConfig
    layout: fmt.RecordLayout
    ffn_dtype: str
    dense_file_bytes: int
    embed_bytes: int
    tokenizer_file_bytes: int
    lean_tokenizer: bool = True      # the file is one the lean BPE reproduces (else HF tokenizers)

    @classmethod
    def of(cls, src: Bundle | Sizes, lean_tokenizer: bool | None = None) -> Sizes:
        """``lean_tokenizer`` None: found out from the bundle's tokenizer.json (a read of the file;
        the engine passes what its loaded tokenizer is)."""
        if isinstance(src, Sizes):
            return src
        if lean_tokenizer is None:
            from flashinfer_local.runtime.bpe_tables import unsupported_reason
            lean_tokenizer = src.tokenizer_file is None or unsupported_reason(src.tokenizer_file) is None
        return cls(src.config, src.layout, src.ffn_dtype, (src.path / fmt.DENSE_FILE).stat().st_size,
                   src.dense_nbytes("embed") + (src.dense_nbytes("embed.scale") if src.has_dense("embed.scale") else 0),
                   src.sizes()["tokenizer_bytes"], lean_tokenizer)


@dataclass(frozen=True)
class Placed:
    """What a stored placement (``predictors.plan_file``) asks of the budget."""
    pinned: tuple[int, ...]          # per layer: neurons pinned in DRAM
    window_rows: tuple[int, ...]     # per layer: window rows beside them
    device_dram_bytes: int = 0       # device-pinned neurons held in DRAM (a CPU device's tensors)
    planned_budget: int | None = None  # the budget the placement was solved for (for the message)


@dataclass(frozen=True)
class BudgetPlan:
    mode: str                # none | window | naive
    budget_bytes: int | None  # None: no limit
    context: int             # tokens the KV cache is planned for
    dense_bytes: int
    ffn_dram_bytes: int
    cache_rows_per_layer: int
    cache_bytes: int         # window cache rows + their bookkeeping (+ per-plan temporaries)
    buffer_bytes: int
    kv_bytes: int
    selector_bytes: int
    tokenizer_bytes: int
    slack_bytes: int
    draft_bytes: int = 0     # a speculative draft: a draft model in DRAM, or the self draft's KV cache
    rows_per_layer: tuple = ()    # with a placement: each layer's window rows, pinned ones included
    pinned_per_layer: tuple = ()  # with a placement: each layer's DRAM-pinned neurons (rows at the front)

    def owners(self) -> dict[str, int]:
        """Planned bytes by owner (the names ``measure.profile`` attributes RSS to)."""
        return {"dense": self.dense_bytes, "ffn_dram": self.ffn_dram_bytes, "window": self.cache_bytes,
                "buffers": self.buffer_bytes, "kv_cache": self.kv_bytes, "selector": self.selector_bytes,
                "tokenizer": self.tokenizer_bytes, "slack": self.slack_bytes, "draft": self.draft_bytes}

    @property
    def total_bytes(self) -> int:
        return sum(self.owners().values())

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- sizes of each owner

def kv_layer_bytes(cfg: ModelConfig, tokens: int, itemsize: int = 2) -> list[int]:
    """Keys + values of each layer position (``ModelConfig.stack``) at ``tokens`` tokens
    (``models.common.kv_itemsize`` bytes each, by its layer's key/value heads; a local layer holds
    its window's ring, ``kv_slots``): what ``models.common.KVCache`` allocates."""
    return [kv_slots(cfg, i, tokens) * b for i, b in zip(cfg.stack, cfg.kv_layer_bytes_per_token(itemsize))]


def rope_table_bytes(cfg: ModelConfig, tokens: int) -> int:
    """The cos/sin tables [tokens, head_dim] f32 of a rope model, one pair per kind of rotation
    (Gemma 3: global and local; learned positions: none)."""
    return len(rope_kinds(cfg)) * 2 * tokens * cfg.head_dim * 4


def kv_cache_bytes(cfg: ModelConfig, tokens: int, itemsize: int = 2) -> int:
    """The KV cache at ``tokens`` tokens, rotary tables included: the one formula."""
    return sum(kv_layer_bytes(cfg, tokens, itemsize)) + rope_table_bytes(cfg, tokens)


def dense_resident_bytes(cfg: ModelConfig, dense_file_bytes: int, embed_bytes: int, context: int) -> int:
    """The dense file counted whole, except an untied embedding (``embed_bytes``: with a quantized
    one's scales): only the pages ``context`` lookups touch, each a row's pages, one more for a
    row across a page boundary and one for its scales."""
    if cfg.tie_embeddings:
        return dense_file_bytes
    row = embed_bytes // cfg.vocab_size
    touched = min(embed_bytes, context * (-(-row // PAGE) + 2) * PAGE)
    return dense_file_bytes - embed_bytes + touched


def prefill_scratch_bytes(cfg: ModelConfig, context: int) -> int:
    """The largest set of temporaries one prefill chunk (PREFILL_TOKENS tokens, keys up to
    ``context``) holds at once: its hidden states and their normalized copies, the q/k/v
    projections and their rotated copies, the attention's block of scores
    (``models.common.attention_scratch_bytes``), the activations [T, d_ff] with their gate/up
    temporaries, the f32 weight scratch of a quantized matmul (UPCAST_BYTES) and the logits of two
    rows of the head."""
    T = min(PREFILL_TOKENS, context)
    d, qkv = cfg.d_model, (cfg.n_heads + 2 * max(cfg.n_kv_heads)) * cfg.head_dim
    hidden = 6 * T * d * 4
    attn = 2 * T * qkv * 4 + attention_scratch_bytes(cfg, context)
    ffn = 3 * T * cfg.d_ff * 4
    return hidden + max(attn, ffn) + UPCAST_BYTES + 2 * cfg.vocab_size * 4


def slack_bytes(cfg: ModelConfig, context: int) -> int:
    return prefill_scratch_bytes(cfg, context) + ALLOCATOR_SLACK_BYTES


def tokenizer_bytes(tokenizer_file_bytes: int, lean: bool = True) -> int:
    return TOKENIZER_RSS_PER_FILE_BYTE["lean" if lean else "tokenizers"] * tokenizer_file_bytes


def compute_scratch_bytes(s: Sizes) -> int:
    """What ``dram.RecordCompute`` allocates: the kernel's activations, per-block accumulators and
    copy of x for up to SMALL_T tokens (``kernels.RecordKernel``), the decode output row, and for
    quantized records the f32 field matrices of one prefill chunk."""
    d = s.cfg.d_model
    kernel = RecordKernel.scratch_bytes(s.layout, s.ffn_dtype, d, s.cfg.d_ff) + 4 * d
    if s.ffn_dtype in fmt.DTYPES:
        return kernel
    return kernel + len(s.layout.vectors) * CHUNK_ROWS * d * 4


def dram_ffn_bytes(s: Sizes) -> tuple[int, int]:
    """(records, scratch) of the all-in-DRAM backend: f16/f32 bundles split into per-field
    matrices (``dram.DenseFFN``), int8/int4 bundles as records, with the down columns as an int8
    matrix where they are split out (``dram.RecordFFN``)."""
    cfg, lay = s.cfg, s.layout
    n, d, ff = cfg.n_layers, cfg.d_model, cfg.d_ff
    if s.ffn_dtype in fmt.DTYPES:
        item = np.dtype(fmt.DTYPES[s.ffn_dtype]).itemsize
        per_layer = ff * d * item * len(lay.vectors) + (0 if cfg.gated else 4 * ff)    # (gate-split: no gate)
        return n * per_layer, 0
    scratch = compute_scratch_bytes(s)
    if not splits_down(cfg, lay):
        return n * ff * lay.record_bytes, scratch
    down = lay.field("down")
    records = n * (ff * down.offset + d * ff + 2 * d * (ff // 32))     # gate/up part + int8 down + scales
    return records, scratch + n * QuantMatrix.scratch_bytes(d, ff)


def stream_buffer_bytes(s: Sizes) -> int:
    """A streaming backend's buffers: the read scratch and compute scratch it allocates, plus a
    prefill chunk in flight (cached rows gathered, then as f32 for BLAS)."""
    lay = s.layout
    allocated = SCRATCH_BUFFERS * CHUNK_ROWS * lay.record_bytes + compute_scratch_bytes(s)
    payload_f32 = 4 * sum(f.count for f in lay.fields if "." not in f.name)
    transient = CHUNK_ROWS * lay.record_bytes + (CHUNK_ROWS * payload_f32 if s.ffn_dtype in fmt.DTYPES else 0)
    return allocated + transient


def stream_allocated_buffer_bytes(s: Sizes) -> int:
    """The part of ``stream_buffer_bytes`` that is allocated up front (the rest is transient)."""
    return SCRATCH_BUFFERS * CHUNK_ROWS * s.layout.record_bytes + compute_scratch_bytes(s)


def window_rows(cfg: ModelConfig, record_bytes: int, free: int, evict: str = "recency") -> int:
    """Cache rows per layer that ``free`` bytes hold (each layer the same; at most d_ff)."""
    per_layer = free // cfg.n_layers - cfg.d_ff * (wc.neuron_meta_bytes(evict) + wc.PLAN_SCRATCH_BYTES_PER_NEURON)
    return max(0, min(cfg.d_ff, per_layer // (record_bytes + wc.ROW_META_BYTES)))


def layer_window_bytes(cfg: ModelConfig, record_bytes: int, rows: int, evict: str = "recency") -> int:
    """One layer's window of ``rows`` rows (``storage.window_cache.window_bytes``) and its per-plan
    temporaries."""
    return wc.window_bytes(cfg.d_ff, record_bytes, rows, evict) + cfg.d_ff * wc.PLAN_SCRATCH_BYTES_PER_NEURON


def window_cache_bytes(cfg: ModelConfig, record_bytes: int, rows: int | tuple, evict: str = "recency") -> int:
    """Every layer's window: ``rows`` rows each, or per layer (a placement's); none without rows."""
    per_layer = (rows,) * cfg.n_layers if isinstance(rows, int) else rows
    if max(per_layer) == 0:
        return 0
    return sum(layer_window_bytes(cfg, record_bytes, r, evict) for r in per_layer)


# ---------------------------------------------------------------- selectors

def default_predictor(path: Path) -> str:
    have = store.available(path)
    if not have:
        raise FlashinferError(f"{path} has no calibrated predictor; run: flashinfer-local calibrate {path}")
    return have[0]


def predictor_bytes(bundle: Bundle, kind: str | None) -> int:
    """DRAM a PredictorSelector of this bundle will hold, known before it is loaded."""
    cfg = bundle.config
    kind = kind or default_predictor(bundle.path)
    if kind == "threshold" and bundle.gate_split:      # scores with the dense gate's values
        return 0
    if kind == "threshold":        # int8 codes + f16 scales per 32 (and the matrix's decode scratch),
        if cfg.d_model % 32 == 0:  # else f16; + an f32 bias for ReLU models
            layer = cfg.d_ff * (cfg.d_model + cfg.d_model // 16) + QuantMatrix.scratch_bytes(cfg.d_ff, cfg.d_model)
        else:
            layer = cfg.d_ff * 2 * cfg.d_model
        return cfg.n_layers * (layer + (0 if cfg.gated else 4 * cfg.d_ff))
    return store.file_tensor_bytes(bundle.path, kind) if store.predictor_path(bundle.path, kind).exists() else 0


def selector_bytes(name: str, bundle: Bundle, predictor: str | None) -> int:
    """Budgeted bytes of a selector (the oracle, a measuring tool, is held outside the budget)."""
    return predictor_bytes(bundle, predictor) if name == "predictor" else 0


# ---------------------------------------------------------------- the plan

def _fixed_plan(s: Sizes, context: int, mode: str, selector: int, draft: int = 0) -> BudgetPlan:
    """The plan of ``mode`` before the window gets anything: every owner the mode holds whatever
    the budget (its total is the mode's minimum budget)."""
    dense = dense_resident_bytes(s.cfg, s.dense_file_bytes, s.embed_bytes, context)
    records, buffers = dram_ffn_bytes(s) if mode == "none" else (0, stream_buffer_bytes(s))
    return BudgetPlan(mode, None, context, dense, records, 0, 0, buffers, kv_cache_bytes(s.cfg, context, kv_itemsize(s.ffn_dtype)),
                      selector, tokenizer_bytes(s.tokenizer_file_bytes, s.lean_tokenizer), slack_bytes(s.cfg, context), draft)


def minimum_budget(src: Bundle | Sizes, context: int, offload: str = "window", selector: int = 0,
                   draft: int = 0) -> int:
    """The smallest budget that runs ``offload``: for window/naive the fixed part with no cache
    rows, for none everything in DRAM."""
    return _fixed_plan(Sizes.of(src), context, offload, selector, draft).total_bytes


def draft_model_bytes(src: Bundle | Sizes, context: int) -> int:
    """What a draft model holds all in DRAM beside its target: everything but the tokenizer (the
    target's is shared) and the allocator slack (counted once, in the target's plan)."""
    p = _fixed_plan(Sizes.of(src), context, "none", 0)
    return p.total_bytes - p.tokenizer_bytes - p.slack_bytes


def parts_text(dense: int, kv: int, buffers: int, tokenizer: int, slack: int, predictor: int = 0,
               draft: int = 0) -> str:
    """The fixed parts of a plan as `run`'s budget error and `estimate` both name them:
    "dense 206.87MiB + KV 25.00MiB + ... = 351.99MiB"."""
    parts = [("dense", dense), ("KV", kv), ("buffers", buffers), ("tokenizer", tokenizer), ("slack", slack),
             ("predictor", predictor), ("draft", draft)]
    return (" + ".join(f"{k} {fmt_bytes(v)}" for k, v in parts if v or k not in ("predictor", "draft"))
            + f" = {fmt_bytes(sum(v for _, v in parts))}")


def plan_budget(src: Bundle | Sizes, budget: int | None, context: int, offload: str | None = None,
                selector: int = 0, evict: str = "recency", draft: int = 0, placed: Placed | None = None) -> BudgetPlan:
    """Split ``budget`` bytes (None: no limit) between owners. ``offload`` None chooses: none when
    everything fits the budget (or there is none), else window. ``placed``: in window mode, each
    layer's pinned neurons and window rows as a stored placement says (what is left of the budget
    adds rows to every layer)."""
    assert offload in (None, *OFFLOAD_MODES), offload          # EngineOptions validates user input
    s = Sizes.of(src)
    cfg = s.cfg
    if offload is None:
        offload = ("none" if budget is None or budget >= minimum_budget(s, context, "none", selector, draft)
                   else "window")
    plan = _fixed_plan(s, context, offload, selector, draft)
    fixed = plan.total_bytes
    if budget is not None and budget < fixed:
        if offload == "none":
            raise FlashinferError(f"--dram-budget {fmt_bytes(budget)} cannot hold this model in DRAM "
                                  f"(needs about {fmt_bytes(fixed)}); use --offload window")
        raise FlashinferError(
            f"--dram-budget {fmt_bytes(budget)} is too small for this model: streaming it at {context} tokens "
            f"needs at least " + parts_text(plan.dense_bytes, plan.kv_bytes, plan.buffer_bytes, plan.tokenizer_bytes,
                                            plan.slack_bytes, selector, draft)
            + "; raise the budget or lower --context"
            + ("; the threshold predictor holds the gate rows, --predictor lowrank does not"
               if selector and selector >= cfg.n_layers * cfg.d_ff * cfg.d_model else ""))
    plan = replace(plan, budget_bytes=budget)
    if offload != "window":
        return plan
    if placed is not None:
        return _placed_plan(plan, s, budget, fixed, evict, placed)
    rows = window_rows(cfg, s.layout.record_bytes, (UNLIMITED if budget is None else budget) - fixed, evict)
    return replace(plan, cache_rows_per_layer=rows,
                   cache_bytes=window_cache_bytes(cfg, s.layout.record_bytes, rows, evict))


def placement_dram_bytes(src: Bundle | Sizes, budget: int, context: int, selector: int = 0,
                         evict: str = "recency") -> tuple[int, int]:
    """(bytes a placement's rows may take under ``budget``, the budget below which there are none):
    what is left after the streaming fixed part and the windows' per-neuron bookkeeping (what
    ``_placed_plan`` counts for a placement's rows)."""
    s = Sizes.of(src)
    before = minimum_budget(s, context, "window", selector) + s.cfg.n_layers * layer_window_bytes(
        s.cfg, s.layout.record_bytes, 0, evict)
    return budget - before, before


def _placed_plan(plan: BudgetPlan, s: Sizes, budget: int | None, fixed: int, evict: str, placed: Placed) -> BudgetPlan:
    """The window owner sized by a placement: per layer its pinned and window rows, plus an equal
    share of what the budget has left; refused when the budget cannot hold the placement."""
    cfg, rec = s.cfg, s.layout.record_bytes
    rows = [p + w for p, w in zip(placed.pinned, placed.window_rows)]
    need = window_cache_bytes(cfg, rec, tuple(rows), evict) + placed.device_dram_bytes
    free = UNLIMITED if budget is None else budget - fixed
    if need > free:
        made = f" (it was solved for {fmt_bytes(placed.planned_budget)})" if placed.planned_budget else ""
        raise FlashinferError(f"--dram-budget {fmt_bytes(budget)} cannot hold the bundle's stored placement{made}: "
                              f"it needs {fmt_bytes(fixed + need)}; re-run flashinfer-local plan with this budget, "
                              "or run with --placement none")
    extra = min(cfg.d_ff, (free - need) // (cfg.n_layers * (rec + wc.ROW_META_BYTES)))
    rows = tuple(min(cfg.d_ff, r + extra) for r in rows)
    return replace(plan, cache_rows_per_layer=int(round(np.mean(rows))), rows_per_layer=rows,
                   pinned_per_layer=tuple(placed.pinned), cache_bytes=window_cache_bytes(cfg, rec, rows, evict),
                   ffn_dram_bytes=placed.device_dram_bytes)
