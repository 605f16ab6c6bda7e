"""`estimate`: what a model will cost, from its config alone, before converting or running it.

Per bundle precision: the files ``convert`` would write (their exact sizes: the safetensors
headers are computed from the same specs the converter declares), the dense part, the FFN record
size, and the smallest ``--dram-budget`` that runs: the functions of ``runtime.budget`` the engine's
plan calls, given sizes computed from the config (``budget.Sizes``). The KV cache per token and at
``context`` tokens follows each layer's own key/value heads (variable GQA). Given a budget, says
whether the model runs all in DRAM, streams (and what share of the FFN the window cache holds), or
does not fit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import format as fmt
from storage.config import ModelConfig
from storage.convert import dense_specs, ffn_specs
from storage.st_writer import encode_header

from flashinfer_local.runtime import budget as budget_mod
from flashinfer_local.runtime.budget import Sizes
from flashinfer_local.units import fmt_bytes

# Bundle precisions (convert --dtype): the records' dtype and the quantized matrices' codes
# (storage.format.Precision); norms and biases stay f32
PRECISIONS = fmt.CONVERT_DTYPES


def load_config(model: str | Path | None) -> tuple[ModelConfig, dict]:
    """MODEL (bundle directory, HF folder, GGUF file; None: the default model, fetched but not
    converted) -> (config, facts: kind, path, tokenizer bytes, a bundle's own sizes and dtype)."""
    from storage.errors import FlashinferError
    from storage.source import open_source
    if model is None:
        from flashinfer_local.workflows.fetch import DEFAULT_MODEL, fetch
        model = fetch(DEFAULT_MODEL)
    p = Path(model)
    if not p.exists():
        raise FlashinferError(f"MODEL '{model}' not found: give a bundle directory, an HF checkpoint "
                              "folder or a GGUF file (or omit it for the default model)")
    if p.is_dir() and (p / fmt.MANIFEST).exists():
        from storage.reader import Bundle
        b = Bundle(p)
        files = b.sizes()["files"]
        return b.config, {"kind": "bundle", "path": str(p), "dtype": b.ffn_dtype,
                          "tokenizer_bytes": files.get(fmt.TOKENIZER_FILE, 0), "bundle": b.sizes(),
                          # its own matrices' codes, so the row of its precision is its files
                          "low_codes": {n: c for n, c in b.quantized_dense.items() if c != "q8"},
                          "lean_tokenizer": budget_mod.Sizes.of(b).lean_tokenizer}
    with open_source(p) as src:
        tok = src.tokenizer.tokenizer_json
        low = {n: src.low_codes(n) for n in fmt.quantized_dense(src.config, "int4") if src.low_codes(n)}
        return src.config, {"kind": src.identity.get("kind", "checkpoint"), "path": str(p),
                            "tokenizer_bytes": len(tok.encode()) if tok is not None else 0, "low_codes": low,
                            "lean_tokenizer": tok is None or _lean(tok)}


def _lean(tokenizer_json: str) -> bool:
    """Whether the lean BPE reproduces this tokenizer.json (else the engine holds HF tokenizers)."""
    import tempfile
    from flashinfer_local.runtime.bpe_tables import unsupported_reason
    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as f:
        f.write(tokenizer_json)
        f.flush()
        return unsupported_reason(f.name) is None


def bundle_bytes(cfg: ModelConfig, dtype: str, tokenizer_bytes: int = 0, low_codes=None,
                 lean_tokenizer: bool = True) -> dict:
    """Exact sizes of the files ``convert --dtype dtype`` writes for ``cfg``; ``low_codes``: name ->
    the codes of each matrix the checkpoint stores at 6 bits or fewer (``storage.source.Source.low_codes``);
    ``lean_tokenizer``: whether the lean BPE will hold the tokenizer (``load_config``)."""
    p = fmt.Precision.named(dtype)
    layout = fmt.record_layout(cfg, p.ffn, p.down, p.gate_up)
    low = dict(low_codes or {})
    specs = dense_specs(cfg, dtype, low.get)
    dense = encode_header(specs)[2]
    ffn = encode_header(ffn_specs(cfg, layout))[2]
    embed = sum(int(np.prod(shape)) * dt.itemsize for name, dt, shape in specs if name in ("embed", "embed.scale"))
    return {"dense_bytes": dense, "ffn_bytes": ffn, "tokenizer_bytes": tokenizer_bytes,
            "total_bytes": dense + ffn + tokenizer_bytes, "embed_bytes": embed,
            "record_bytes": layout.record_bytes, "layout": layout, "dtype": dtype, "lean_tokenizer": lean_tokenizer}


def _sizes(cfg: ModelConfig, sizes: dict) -> Sizes:
    # the tokenizer planned as the engine will hold it: the lean BPE, or HF tokenizers for a file the
    # lean one does not reproduce (Gemma's SentencePiece vocabulary)
    return Sizes(cfg, sizes["layout"], fmt.Precision.named(sizes["dtype"]).ffn, sizes["dense_bytes"], sizes["embed_bytes"],
                 sizes["tokenizer_bytes"], sizes.get("lean_tokenizer", True))


def kv_cache(cfg: ModelConfig, tokens: int) -> dict:
    """KV cache (f16, as the engine holds it for all but f32 bundles) per token, per layer and at
    ``tokens`` tokens."""
    per_layer = budget_mod.kv_layer_bytes(cfg, 1)                              # bytes per token
    at = budget_mod.kv_layer_bytes(cfg, tokens)
    return {"per_token_bytes": sum(per_layer), "per_layer_per_token_bytes": per_layer,
            "tokens": tokens, "bytes": sum(at), "per_layer_bytes": at,
            "local_layers": len(cfg.sliding_layers), "sliding_window": cfg.sliding_window,
            "rope_tables_bytes": budget_mod.rope_table_bytes(cfg, tokens)}


def draft_bytes(cfg: ModelConfig, dtype: str, tokenizer_bytes: int, context: int, low_codes=None,
                lean_tokenizer: bool = True) -> int:
    """What a draft model of ``cfg`` converted to ``dtype`` holds beside its target (``--draft``)."""
    return budget_mod.draft_model_bytes(_sizes(cfg, bundle_bytes(cfg, dtype, tokenizer_bytes, low_codes, lean_tokenizer)),
                                        context)


def budget_parts(cfg: ModelConfig, sizes: dict, context: int, draft: int = 0) -> dict:
    """The smallest --dram-budget that runs, and its parts as ``budget.plan_budget`` counts them:
    the streaming minimum (a plan without window rows) or, for a model smaller than the streaming
    buffers, the all-in-DRAM size; ``draft``: bytes a speculative draft holds inside the budget."""
    plan = budget_mod.plan_budget(_sizes(cfg, sizes), None, context, "naive", draft=draft)
    streaming, in_dram = plan.total_bytes, in_dram_bytes(cfg, sizes, context, draft)
    return {"dense_bytes": plan.dense_bytes, "kv_bytes": plan.kv_bytes, "buffer_bytes": plan.buffer_bytes,
            "tokenizer_bytes": plan.tokenizer_bytes, "slack_bytes": plan.slack_bytes, "draft_bytes": draft,
            "streaming_bytes": streaming, "in_dram_bytes": in_dram, "minimum_bytes": min(streaming, in_dram)}


def in_dram_bytes(cfg: ModelConfig, sizes: dict, context: int, draft: int = 0) -> int:
    """The budget from which the engine holds everything in DRAM (offload none)."""
    return budget_mod.minimum_budget(_sizes(cfg, sizes), context, "none", draft=draft)


def window_rows(cfg: ModelConfig, sizes: dict, minimum: dict, budget: int) -> int:
    """Window cache rows per layer a streaming run gets from ``budget`` (the plan's own rule)."""
    return budget_mod.plan_budget(_sizes(cfg, sizes), budget, minimum["context"], "window",
                                  draft=minimum.get("draft_bytes", 0)).cache_rows_per_layer


def verdict(cfg: ModelConfig, sizes: dict, minimum: dict, budget: int) -> dict:
    """What a run with ``budget`` does: all in DRAM, streams (window cache share), or too small."""
    if budget >= minimum["in_dram_bytes"]:
        return {"mode": "none", "text": "runs all in DRAM"}
    if budget < minimum["streaming_bytes"]:
        return {"mode": "too small", "text": f"too small (minimum {fmt_bytes(minimum['minimum_bytes'])})"}
    rows = window_rows(cfg, sizes, minimum, budget)
    share = rows / cfg.d_ff
    return {"mode": "window", "cache_rows_per_layer": rows, "ffn_share_cached": share,
            "text": f"streams; window cache holds {100 * share:.0f}% of the FFN ({rows} rows/layer)"}


def estimate(cfg: ModelConfig, context: int = 2048, budget: int | None = None,
             tokenizer_bytes: int = 0, draft: int = 0, low_codes=None, lean_tokenizer: bool = True) -> dict:
    """Sizes per precision, KV cache, minimum budget and (given ``budget``) the verdict; ``draft``:
    bytes a speculative draft model holds inside the budget (``draft_bytes``)."""
    context = min(context, cfg.max_position)
    rows = {}
    for dtype in PRECISIONS:
        try:
            sizes = bundle_bytes(cfg, dtype, tokenizer_bytes, low_codes, lean_tokenizer)
        except ValueError:            # int8/int4 need d_model divisible by the group size
            continue
        minimum = {**budget_parts(cfg, sizes, context, draft), "context": context}
        r = {**{k: v for k, v in sizes.items() if k not in ("layout", "dtype")}, "minimum_budget": minimum}
        if budget is not None:
            r["verdict"] = verdict(cfg, sizes, minimum, budget)
        rows[dtype] = r
    return {"context": context, "budget_bytes": budget, "draft_bytes": draft, "precisions": rows, "kv_cache": kv_cache(cfg, context),
            "model": {"arch": cfg.arch, "n_layers": cfg.n_layers, "depth": cfg.depth, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
                      "n_heads": cfg.n_heads, "n_kv_heads": list(cfg.n_kv_heads), "head_dim": cfg.head_dim,
                      "vocab_size": cfg.vocab_size, "max_position": cfg.max_position}}


def report_lines(e: dict, facts: dict) -> list[str]:
    """The terminal form of an ``estimate`` result."""
    m, kv = e["model"], e["kv_cache"]
    kvh = sorted(set(m["n_kv_heads"]))
    depth = m.get("depth", m["n_layers"])
    layers = f"{m['n_layers']} layers" if depth == m["n_layers"] else f"{depth} layer positions over {m['n_layers']} stored layers"
    lines = [f"{facts['path']} ({facts['kind']}): {m['arch']}, {layers}, d_model {m['d_model']}, "
             f"d_ff {m['d_ff']}, heads {m['n_heads']} (kv {kvh[0] if len(kvh) == 1 else m['n_kv_heads']}), "
             f"vocab {m['vocab_size']}",
             f"{'precision':<10}{'bundle':>12}{'dense':>12}{'ffn':>12}{'record':>10}{'min budget':>13}"
             f"{'all in DRAM':>13}"
             + ("   at --dram-budget " + fmt_bytes(e["budget_bytes"]) if e["budget_bytes"] else "")]
    for dtype, r in e["precisions"].items():
        mark = " *" if facts.get("dtype") == dtype else ""
        lines.append(f"{dtype + mark:<10}{fmt_bytes(r['total_bytes']):>12}{fmt_bytes(r['dense_bytes']):>12}"
                     f"{fmt_bytes(r['ffn_bytes']):>12}{str(r['record_bytes']) + 'B':>10}"
                     f"{fmt_bytes(r['minimum_budget']['minimum_bytes']):>13}"
                     f"{fmt_bytes(r['minimum_budget']['in_dram_bytes']):>13}"
                     + (f"   {r['verdict']['text']}" if "verdict" in r else ""))
    if facts.get("dtype"):
        lines.append(f"* this bundle's precision (its files: {fmt_bytes(facts['bundle']['total_bytes'])})")
    per_layer = sorted(set(kv["per_layer_per_token_bytes"]))
    lines.append(f"KV cache (f16): {fmt_bytes(kv['per_token_bytes'])}/token"
                 + ("" if len(per_layer) == 1 else f" (per layer {fmt_bytes(per_layer[0])} to "
                                                     f"{fmt_bytes(per_layer[-1])}: variable GQA)")
                 + f", {fmt_bytes(kv['bytes'])} at {kv['tokens']} tokens (+ rotary tables "
                 f"{fmt_bytes(kv['rope_tables_bytes'])})"
                 + (f"; {kv['local_layers']} of {len(kv['per_layer_bytes'])} layers attend to a window of "
                    f"{kv['sliding_window']} tokens and keep only those" if kv["local_layers"] else ""))
    f16 = e["precisions"].get(facts.get("dtype") or "f16")
    mb = f16["minimum_budget"]
    lines.append(f"streaming minimum at {e['context']} tokens ({facts.get('dtype') or 'f16'}): "
                 + budget_mod.parts_text(mb["dense_bytes"], mb["kv_bytes"], mb["buffer_bytes"], mb["tokenizer_bytes"],
                                         mb["slack_bytes"], draft=mb.get("draft_bytes", 0))
                 + ("" if mb["streaming_bytes"] <= mb["in_dram_bytes"] else
                    "; above the all-in-DRAM size, so the minimum is to hold it all"))
    lines.append("min budget: the smallest --dram-budget that runs; all in DRAM: from this budget on, "
                 "nothing streams")
    return lines
