"""The DRAM budget: what the engine will hold for a model, planned before anything is loaded.

One plan, computed from the bundle and the options, says how many bytes each owner gets: the dense
part (memory-mapped; attention and the head are touched whole every token), the KV cache, read
buffers and compute scratch, and the window cache, which gets whatever is left. An untied embedding
matrix is the exception in the dense part: a token reads one row of it, so only the pages that
``context`` tokens can touch are counted, and the rest stays on the SSD. A budget that cannot hold
the fixed part is refused with the minimum that would work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from storage import format as fmt
from storage.config import ModelConfig
from storage.errors import FlashinferError
from storage.reader import Bundle

from flashinfer_local.units import fmt_bytes

CHUNK_ROWS = 1024          # records computed per step: bounds the f32 scratch of one step
SCRATCH_BUFFERS = 2        # overflow/naive reads: one chunk read while the previous is computed
KERNEL_THREADS_MAX = 64    # per-thread kernel scratch is counted for up to this many threads
PAGE = 4096
# The tokenizer (HF `tokenizers`, loaded from tokenizer.json) holds about 21-22x its file's size:
# measured 106 MiB for Qwen2.5's 5.1 MiB file and 33 MiB for SmolLM2's 1.5 MiB one.
TOKENIZER_RSS_PER_FILE_BYTE = 24
SLACK_BYTES = 96 << 20     # activations, logits, allocator slack, small per-token arrays


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    dense_bytes: int         # dense.safetensors, memory-mapped
    kv_bytes: int            # KV cache + rotary tables at `context` tokens
    buffer_bytes: int        # read scratch (records) + f32 compute scratch
    tokenizer_bytes: int     # the loaded tokenizer (estimated from its file size)
    selector_bytes: int      # a sparsity predictor's weights (threshold: the gate rows)
    slack_bytes: int
    cache_rows_per_layer: int
    cache_bytes: int         # window cache rows + their bookkeeping
    context: int

    def to_dict(self) -> dict:
        return asdict(self)


def numba_threads() -> int:
    """Threads numba may run a kernel on (the decode kernel keeps one accumulator for each)."""
    import numba
    return numba.config.NUMBA_NUM_THREADS


def dense_resident_bytes(cfg: ModelConfig, dense_file_bytes: int, embed_bytes: int, context: int) -> int:
    """The dense file counted whole, except an untied embedding: only the rows ``context`` lookups touch."""
    if cfg.tie_embeddings:
        return dense_file_bytes
    row = embed_bytes // cfg.vocab_size
    touched = min(embed_bytes, context * (-(-row // PAGE) + 1) * PAGE)
    return dense_file_bytes - embed_bytes + touched


def tokenizer_bytes(tokenizer_file_bytes: int) -> int:
    return TOKENIZER_RSS_PER_FILE_BYTE * tokenizer_file_bytes


def fixed_bytes(cfg: ModelConfig, layout: fmt.RecordLayout, dense_file_bytes: int,
                embed_bytes: int, context: int) -> tuple[int, int, int]:
    """(dense, KV cache, buffers) a streaming run holds whatever the window gets, from sizes alone
    (the tokenizer and the slack come on top).

    Shared by the engine's plan and by ``estimate`` (which has no bundle yet).
    """
    dense = dense_resident_bytes(cfg, dense_file_bytes, embed_bytes, context)
    kv = context * cfg.kv_bytes_per_token(4) + 2 * context * cfg.head_dim * 4
    # f32 values of one record in a prefill chunk: f16/f32 records upcast, or int8/int4 records'
    # vectors dequantized into RecordCompute's reused [chunk, d] matrices
    payload_f32 = 4 * sum(f.count for f in layout.fields if "." not in f.name)
    # read scratch + prefill chunk (cached rows gathered, then as f32) + the decode kernel's
    # per-thread accumulator
    kernel = min(numba_threads(), KERNEL_THREADS_MAX) * 4 * cfg.d_model
    buffers = (SCRATCH_BUFFERS + 1) * CHUNK_ROWS * layout.record_bytes + CHUNK_ROWS * payload_f32 + kernel
    return dense, kv, buffers


def _fixed(bundle: Bundle, context: int) -> tuple[int, int, int, int]:
    embed = bundle.dense_nbytes("embed")
    dense, kv, buffers = fixed_bytes(bundle.config, bundle.layout,
                                     (bundle.path / fmt.DENSE_FILE).stat().st_size, embed, context)
    return dense, kv, buffers, tokenizer_bytes(bundle.sizes()["tokenizer_bytes"])


# storage.window_cache.LayerWindow's metadata: per row ids (int32), last_used and uses (int64); per
# neuron slot (int32), freq (int64) and at most one int64 per neuron of per-plan overflow scratch
WINDOW_ROW_META = 4 + 8 + 8
WINDOW_NEURON_META = 4 + 8 + 8


def window_rows(cfg: ModelConfig, record_bytes: int, free: int) -> int:
    """Cache rows per layer that ``free`` bytes hold (each layer the same; at most d_ff)."""
    per_layer = free // cfg.n_layers - cfg.d_ff * WINDOW_NEURON_META
    return max(0, min(cfg.d_ff, per_layer // (record_bytes + WINDOW_ROW_META)))


def window_cache_bytes(cfg: ModelConfig, record_bytes: int, rows: int) -> int:
    if rows == 0:
        return 0
    return cfg.n_layers * (rows * (record_bytes + WINDOW_ROW_META) + cfg.d_ff * WINDOW_NEURON_META)


def plan_budget(bundle: Bundle, budget: int, context: int, mode: str, selector_bytes: int = 0) -> BudgetPlan:
    """Split ``budget`` bytes between owners for ``mode`` (window | naive)."""
    cfg, lay = bundle.config, bundle.layout
    dense, kv, buffers, tok = _fixed(bundle, context)
    fixed = dense + kv + buffers + tok + selector_bytes + SLACK_BYTES
    if budget < fixed:
        pred = f", predictor ({fmt_bytes(selector_bytes)})" if selector_bytes else ""
        raise FlashinferError(
            f"--dram-budget {fmt_bytes(budget)} is too small for this model: the dense part "
            f"({fmt_bytes(dense)}), KV cache at {context} tokens ({fmt_bytes(kv)}), tokenizer "
            f"({fmt_bytes(tok)}){pred} and buffers ({fmt_bytes(buffers + SLACK_BYTES)}) need at least "
            f"{fmt_bytes(fixed)}; raise the budget or lower --context"
            + ("; the threshold predictor holds the gate rows, --predictor lowrank does not"
               if selector_bytes and selector_bytes >= cfg.n_layers * cfg.d_ff * cfg.d_model else ""))
    rows = window_rows(cfg, lay.record_bytes, budget - fixed) if mode == "window" else 0
    cache = window_cache_bytes(cfg, lay.record_bytes, rows)
    return BudgetPlan(budget, dense, kv, buffers, tok, selector_bytes, SLACK_BYTES, rows, cache, context)


def in_dram_bytes(cfg: ModelConfig, total_bytes: int, tokenizer_file_bytes: int, context: int) -> int:
    """The budget from which the engine holds the whole bundle in DRAM (offload none)."""
    return total_bytes + context * cfg.kv_bytes_per_token() + tokenizer_bytes(tokenizer_file_bytes) + SLACK_BYTES


def minimum_budget(bundle: Bundle, context: int) -> int:
    dense, kv, buffers, tok = _fixed(bundle, context)
    return dense + kv + buffers + tok + SLACK_BYTES
