"""The DRAM budget: what the engine will hold for a model, planned before anything is loaded.

One plan, computed from the bundle and the options, says how many bytes each owner gets: the dense
part (memory-mapped, fully resident once used: the tied head touches every embedding row), the KV
cache, read buffers and compute scratch, and the window cache, which gets whatever is left. A budget
that cannot hold the fixed part is refused with the minimum that would work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from storage import format as fmt
from storage.errors import FlashinferError
from storage.reader import Bundle

from .units import fmt_bytes

CHUNK_ROWS = 1024          # records computed per step: bounds the f32 scratch of one step
SCRATCH_BUFFERS = 2        # overflow/naive reads: one chunk read while the previous is computed
KERNEL_THREADS_MAX = 64    # per-thread kernel scratch is counted for up to this many threads
SLACK_BYTES = 96 << 20     # activations, logits, allocator slack, small per-token arrays


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    dense_bytes: int         # dense.safetensors, memory-mapped
    kv_bytes: int            # KV cache + rotary tables at `context` tokens
    buffer_bytes: int        # read scratch (records) + f32 compute scratch
    slack_bytes: int
    cache_rows_per_layer: int
    cache_bytes: int         # window cache rows + their bookkeeping
    context: int

    def to_dict(self) -> dict:
        return asdict(self)


def numba_threads() -> int:
    import numba
    return numba.get_num_threads()


def _fixed(bundle: Bundle, context: int) -> tuple[int, int, int]:
    cfg, lay = bundle.config, bundle.layout
    dense = (bundle.path / fmt.DENSE_FILE).stat().st_size
    kv = context * cfg.kv_bytes_per_token(4) + 2 * context * cfg.head_dim * 4
    payload_f32 = lay.payload_bytes * 4 // (2 if bundle.ffn_dtype == "f16" else 4)
    # read scratch + f32 prefill chunk + the decode kernel's per-thread record and accumulator
    kernel = min(numba_threads(), KERNEL_THREADS_MAX) * (payload_f32 + 4 * cfg.d_model)
    buffers = SCRATCH_BUFFERS * CHUNK_ROWS * lay.record_bytes + CHUNK_ROWS * payload_f32 + kernel
    return dense, kv, buffers


def plan_budget(bundle: Bundle, budget: int, context: int, mode: str) -> BudgetPlan:
    """Split ``budget`` bytes between owners for ``mode`` (window | naive)."""
    cfg, lay = bundle.config, bundle.layout
    dense, kv, buffers = _fixed(bundle, context)
    fixed = dense + kv + buffers + SLACK_BYTES
    if budget < fixed:
        raise FlashinferError(
            f"--dram-budget {fmt_bytes(budget)} is too small for this model: the dense part "
            f"({fmt_bytes(dense)}), KV cache at {context} tokens ({fmt_bytes(kv)}) and buffers "
            f"({fmt_bytes(buffers + SLACK_BYTES)}) need at least {fmt_bytes(fixed)}; raise the budget "
            "or lower --context")
    rows = 0
    if mode == "window":
        per_row = lay.record_bytes + 4 + 8 + 8 + 4          # row + ids/last_used/uses + slot share
        rows = min(cfg.d_ff, (budget - fixed) // (per_row * cfg.n_layers))
    cache = rows * cfg.n_layers * (lay.record_bytes + 20) + cfg.n_layers * cfg.d_ff * 4
    return BudgetPlan(budget, dense, kv, buffers, SLACK_BYTES, rows, cache, context)


def minimum_budget(bundle: Bundle, context: int) -> int:
    dense, kv, buffers = _fixed(bundle, context)
    return dense + kv + buffers + SLACK_BYTES
