"""`estimate` from the config alone against what convert writes and what the engine allocates and plans."""
import json

import pytest
from click.testing import CliRunner

from flashinfer_local.runtime import budget
from flashinfer_local.cli import main
from flashinfer_local.measure.estimate import bundle_bytes, estimate, kv_cache, load_config, window_rows
from flashinfer_local.models.common import KVCache
from storage.reader import Bundle
from storage.source import open_source


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "deci"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "int8", "int4"])
def test_bundle_size_is_exact(tiny_ckpt, tiny_bundle, arch, dtype):
    with open_source(tiny_ckpt(arch)) as src:
        cfg, tok = src.config, len(src.tokenizer.tokenizer_json.encode())
    est = bundle_bytes(cfg, dtype, tok)
    real = Bundle(tiny_bundle(arch, dtype)).sizes()
    assert est["dense_bytes"] == real["dense_bytes"]       # headers included: byte for byte
    assert est["ffn_bytes"] == real["ffn_bytes"]
    assert est["total_bytes"] == real["total_bytes"]
    assert est["record_bytes"] == real["record_bytes"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deci", "gemma3"])
@pytest.mark.parametrize("context", [16, 200, 4096])
def test_minimum_budget_matches_the_engines_plan(tiny_bundle, arch, context):
    path = tiny_bundle(arch, "f16")
    cfg, facts = load_config(path)
    e = estimate(cfg, context, tokenizer_bytes=facts["tokenizer_bytes"])
    ctx = min(context, cfg.max_position)                   # the engine caps the context the same way
    assert e["context"] == ctx
    mb = e["precisions"]["f16"]["minimum_budget"]
    assert mb["streaming_bytes"] == budget.minimum_budget(Bundle(path), ctx)
    assert mb["minimum_bytes"] == min(mb["streaming_bytes"], mb["in_dram_bytes"])


@pytest.mark.parametrize("arch", ["deci", "gemma3"])
def test_kv_estimate_equals_the_allocated_cache(tiny_ckpt, arch):
    with open_source(tiny_ckpt(arch)) as src:
        cfg = src.config
    # deci: per-layer key/value heads; gemma3: local layers keep a ring of their window
    assert len(set(cfg.n_kv_heads)) > 1 if arch == "deci" else cfg.sliding_layers == (0, 1)
    for n in (1, 37, 256):
        kv, cache = kv_cache(cfg, n), KVCache(cfg, n)
        assert kv["bytes"] == cache.nbytes
        assert kv["per_layer_bytes"] == [k.nbytes + v.nbytes for k, v in zip(cache.k, cache.v)]
        tables = sum(t.numel() * t.element_size() for t in cache.tables)
        assert kv["rope_tables_bytes"] == tables


def test_verdict_and_window_rows_agree_with_the_plan(tiny_bundle):
    path = tiny_bundle("llama", "f16")
    b = Bundle(path)
    cfg, facts = load_config(path)
    ctx = 64
    sizes = bundle_bytes(cfg, "f16", facts["tokenizer_bytes"])
    e = estimate(cfg, ctx, tokenizer_bytes=facts["tokenizer_bytes"])["precisions"]["f16"]["minimum_budget"]
    assert e["streaming_bytes"] == budget.minimum_budget(b, ctx)
    # the window's rows at budgets above the streaming minimum, as the engine's plan splits them
    row = b.layout.record_bytes + 24
    for extra in (0, row * cfg.n_layers - 1, 50 * row * cfg.n_layers, 1 << 30):
        plan = budget.plan_budget(b, e["streaming_bytes"] + extra, ctx, "window")
        assert window_rows(cfg, sizes, e, e["streaming_bytes"] + extra) == plan.cache_rows_per_layer
    # this tiny model is smaller than the streaming buffers: holding it all is the cheapest way
    assert e["minimum_bytes"] == e["in_dram_bytes"] < e["streaming_bytes"]
    verdict = lambda bud: estimate(cfg, ctx, bud, facts["tokenizer_bytes"])["precisions"]["f16"]["verdict"]  # noqa: E731
    assert verdict(e["in_dram_bytes"])["mode"] == "none"
    assert verdict(e["in_dram_bytes"] - 1)["mode"] == "too small"
    assert "too small (minimum" in verdict(1 << 20)["text"]
    # and the engine agrees: at in_dram it holds everything, one byte less it refuses
    from flashinfer_local.runtime.engine import Engine
    eng = Engine(path, dram_budget=e["in_dram_bytes"], context=ctx)
    assert eng.offload == "none"
    eng.close()
    with pytest.raises(Exception, match="too small"):
        Engine(path, dram_budget=e["in_dram_bytes"] - 1, context=ctx)


def test_cli_estimate_on_checkpoint_and_bundle(tiny_ckpt, tiny_bundle):
    r = CliRunner().invoke(main, ["estimate", str(tiny_ckpt("deci")), "--context", "100",
                                  "--dram-budget", "1GiB"])
    assert r.exit_code == 0, r.output
    assert "f16" in r.output and "f32" in r.output and "variable GQA" in r.output
    assert "runs all in DRAM" in r.output and "streaming minimum" in r.output
    r = CliRunner().invoke(main, ["estimate", str(tiny_bundle("deci", "f16")), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["precisions"]["f16"]["total_bytes"] == Bundle(tiny_bundle("deci", "f16")).sizes()["total_bytes"]
    r = CliRunner().invoke(main, ["estimate", "/nonexistent/model"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "not found" in r.output


def test_estimate_with_a_draft_adds_what_the_engine_plans_for_it(tiny_ckpt, tiny_bundle):
    """--draft MODEL: a bundle counts as it is, a checkpoint as the int4 bundle it would become;
    the figure is the one the engine's plan holds for that draft."""
    from flashinfer_local.runtime.engine import Engine
    target, draft = tiny_bundle("llama", "f16"), tiny_bundle("qwen2", "int4")
    args = ["estimate", str(target), "--context", "64", "--json"]
    plain = json.loads(CliRunner().invoke(main, args).output)
    for d in (draft, tiny_ckpt("qwen2")):
        r = CliRunner().invoke(main, [*args, "--draft", str(d)])
        assert r.exit_code == 0, r.output
        e = json.loads(r.output)
        eng = Engine(target, offload="window", context=64, draft=str(draft))
        assert e["draft_bytes"] == eng.plan.draft_bytes > 0
        mb, mb0 = e["precisions"]["f16"]["minimum_budget"], plain["precisions"]["f16"]["minimum_budget"]
        assert mb["streaming_bytes"] == mb0["streaming_bytes"] + e["draft_bytes"]
    r = CliRunner().invoke(main, ["estimate", str(target), "--draft", str(draft)])
    assert "+ draft" in r.output


def test_int4_size_of_a_gguf_is_exact(smollm_bundle):
    """From a GGUF, int4 stores q4 matrices where the file's are 4-bit: the estimate knows which."""
    from flashinfer_local.workflows.fetch import fetch
    cfg, facts = load_config(fetch("smollm2-135m"))
    assert facts["low_codes"]["layers.0.q.weight"] == "q4" and "embed" not in facts["low_codes"]
    est = bundle_bytes(cfg, "int4", facts["tokenizer_bytes"], facts["low_codes"])
    real = Bundle(smollm_bundle("int4")).sizes()
    assert (est["dense_bytes"], est["ffn_bytes"], est["total_bytes"]) == (real["dense_bytes"], real["ffn_bytes"],
                                                                        real["total_bytes"])
