"""`profile`: memory attribution that adds up, phases, per-token series, charts, and the budget sweep.

The attribution check: at the end of a run, other = measured RSS - (runtime baseline + every owner's
resident bytes) must satisfy |other| <= profile.other_tolerance(rss, runtime) = 64 MiB + 10% of the
RSS above the runtime baseline. "other" is what no owner accounts for: the tokenizer (about 33 MiB
for SmolLM2's 49k-token BPE), library code pages first used after the baseline was taken (about
15 MiB of torch kernels), Python objects and allocator slack; measured here at about 20 MiB for the
tiny models and 45 MiB for SmolLM2-135M.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from flashinfer_local.runtime import budget
from flashinfer_local.cli import main
from flashinfer_local.measure.estimate import kv_cache
from flashinfer_local.runtime.sampling import SamplingParams
from flashinfer_local.measure.pages import PageMap, page_cache_bytes
from flashinfer_local.measure.profile import OWNERS, other_tolerance, profile_generation
from storage.reader import Bundle

GREEDY = SamplingParams(temperature=0)


def _profile(path, n=6, **opts):
    return profile_generation(path, {"context": 64, **opts}, "hello there, how are you", n, GREEDY).to_dict()


def _check_attribution(d):
    runtime = d["facts"]["runtime_baseline_bytes"]
    for s in d["snapshots"]:
        assert s["rss"] == sum(s["owners"].values()) + s["other"]
        assert s["owners"]["runtime"] == runtime
        assert all(s["owners"][o] >= 0 for o in OWNERS)
    last = d["snapshots"][-1]
    tol = other_tolerance(last["rss"], runtime)
    assert abs(last["other"]) <= tol, (last["other"], tol)
    assert d["summary"]["attribution"]["within_tolerance"]


@pytest.mark.parametrize("offload", ["none", "window", "naive"])
def test_attribution_adds_up_and_kv_is_exact(tiny_bundle, offload):
    path = tiny_bundle("deci", "f16")                       # per-layer key/value heads
    d = _profile(path, offload=offload)
    _check_attribution(d)
    b = Bundle(path)
    cfg, last, f = b.config, d["snapshots"][-1], d["facts"]
    # the dense part is mapped, untouched after loading, fully used after a forward pass
    load = d["snapshots"][0]
    assert load["phase"] == "load" and load["owners"]["dense"] < b.sizes()["dense_bytes"] // 2
    assert 0 < last["owners"]["dense"] <= b.sizes()["dense_bytes"]
    # the KV cache as allocated, layer by layer, equals the config-only estimate exactly
    cap = f["kv_capacity_tokens"]
    assert cap == d["stats"]["prompt_tokens"] + 6
    assert last["kv_layers"] == [cap * x for x in kv_cache(cfg, cap)["per_layer_per_token_bytes"]]
    assert f["kv_allocated_bytes"] == kv_cache(cfg, cap)["bytes"]
    if offload == "none":
        assert last["owners"]["ffn_dram"] == f["planned"]["ffn_dram_bytes"]   # every record, resident
        assert last["owners"]["window"] == 0
    else:
        assert last["owners"]["ffn_dram"] == 0
        assert last["owners"]["window"] <= f["planned"]["window_cache_bytes"] + cfg.n_layers * cfg.d_ff * 8
    if offload == "window":                                  # unlimited budget: the cache holds every row
        assert all(r == cfg.d_ff for r in last["cache_rows"])
        assert last["owners"]["window"] >= cfg.n_layers * cfg.d_ff * b.layout.record_bytes


def test_phases_series_and_bytes_per_token(tiny_bundle):
    path = tiny_bundle("llama", "f16")
    d = _profile(path, n=5, offload="naive")
    ph = d["phases"]
    assert list(ph) == ["load", "prefill", "decode"]
    assert ph["load"][0] < ph["load"][1] == ph["prefill"][0] < ph["prefill"][1] == ph["decode"][0] < ph["decode"][1]
    t = np.asarray(d["samples"]["t"])
    assert len(t) >= 3 and (np.diff(t) >= 0).all()
    assert max(d["samples"]["rss"]) == d["summary"]["peak_rss_bytes"]
    # naive + all: every forward reads every record of every layer, exactly once
    b = Bundle(path)
    whole = b.config.n_layers * b.config.d_ff * b.layout.record_bytes
    toks = d["tokens"]
    assert len(toks) == d["stats"]["generated_tokens"] == 5
    assert [x["flash_bytes_read"] for x in toks] == [whole] * 5
    assert d["summary"]["decode_bytes_per_token"] == whole
    assert d["summary"]["decode_cache_hit_rate"] == 0.0      # naive has no cache: no hits


def test_pagemap_and_page_cache(tmp_path):
    import mmap
    m = mmap.mmap(-1, 8 << 20)        # a fresh anonymous map: nothing resident until written (np.empty
    a = np.frombuffer(m, np.uint8)    # may reuse pages the allocator already touched)
    with PageMap() as pm:
        assert pm.array(a) < (2 << 20)
        a[: 4 << 20] = 1
        assert (4 << 20) <= pm.array(a) <= (8 << 20)
    del a
    m.close()
    f = tmp_path / "x.bin"
    f.write_bytes(b"\1" * (1 << 20))
    assert page_cache_bytes(f) == 1 << 20                   # just written: in the page cache


def test_cli_profile_writes_json_and_charts(tiny_bundle, tmp_path):
    out = tmp_path / "prof"
    r = CliRunner().invoke(main, ["profile", str(tiny_bundle("llama", "f16")), "-p", "hello", "-n", "4",
                                  "--offload", "window", "--context", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for needle in ("peak RSS", "runtime baseline", "dense (mapped)", "window cache", "KV cache",
                   "attribution", "SSD reads", "page cache", "wrote"):
        assert needle in r.output, needle
    d = json.loads((out / "profile.json").read_text())
    assert set(d) >= {"samples", "phases", "snapshots", "tokens", "page_cache", "summary"}
    import matplotlib.image as mpimg
    for name in ("memory.png", "cache_rows.png", "bytes_per_token.png"):
        p = out / name
        assert p.stat().st_size > 10_000, name
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05, name   # not blank


def test_sweep_rows_budgets_and_target(tiny_bundle, tmp_path):
    path = tiny_bundle("llama", "f16")
    b = Bundle(path)
    ctx = 64
    minimum = budget.minimum_budget(b, ctx)
    out = tmp_path / "sw"
    budgets = f"1MiB,{minimum}B,{minimum + (8 << 20)}B"
    r = CliRunner().invoke(main, ["profile", str(path), "-p", "hello", "-n", "3", "--offload", "window",
                                  "--context", str(ctx), "--sweep", budgets, "--target-tps", "0.01",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "sweep.json").read_text())
    rows = res["rows"]
    assert [x["budget_bytes"] for x in rows] == [1 << 20, minimum, minimum + (8 << 20)]
    assert rows[0]["status"].startswith("too small (minimum")
    for x in rows[1:]:
        assert x["status"] == "ok", x
        assert x["offload"] == "window"
        assert x["decode_tokens_per_s"] > 0
        # the engine's promise, per budget, each measured in its own process
        assert x["peak_above_runtime_bytes"] <= x["budget_bytes"], x
        assert x["within_budget"]
    assert res["smallest_budget_reaching_target"]["budget_bytes"] == minimum
    assert "smallest swept budget reaching" in r.output
    assert (out / "sweep.png").stat().st_size > 10_000


def test_bad_profile_options_are_one_line_errors(tiny_bundle, tmp_path):
    path = str(tiny_bundle("llama", "f16"))
    for args, needle in [(["--target-tps", "3"], "--target-tps needs --sweep"),
                         (["--sweep", "abc%"], "not a percentage"),
                         (["--sweep", "50%", "--dram-budget", "1GiB"], "drop --dram-budget")]:
        r = CliRunner().invoke(main, ["profile", path, "-p", "x", "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and needle in r.output, r.output


def test_smollm2_streaming_attribution(smollm_bundle):
    """The real model, streaming under a budget: owners and RSS agree within the stated tolerance,
    the dense map is fully resident (its head is tied) and the window holds what the plan gave it."""
    path = smollm_bundle("f16")
    b = Bundle(path)
    bud = budget.minimum_budget(b, 64) + (24 << 20)
    d = _profile(path, n=3, dram_budget=bud)
    _check_attribution(d)
    last, f = d["snapshots"][-1], d["facts"]
    assert f["offload"] == "window" and 0 < f["cache_rows_capacity"] < b.config.d_ff
    assert last["owners"]["dense"] >= 0.95 * b.sizes()["dense_bytes"]
    assert all(r == f["cache_rows_capacity"] for r in last["cache_rows"])       # selector all: full
    # resident window bytes: its planned arrays, plus a margin of one int64 per neuron and layer for
    # per-plan temporaries (the budget counts them in WINDOW_NEURON_META, nbytes does not)
    slack = b.config.n_layers * b.config.d_ff * 8
    assert 0.9 * f["planned"]["window_cache_bytes"] <= last["owners"]["window"] <= f["planned"]["window_cache_bytes"] + slack
    assert d["summary"]["decode_bytes_per_token"] > 0
    assert d["summary"]["peak_above_runtime_bytes"] <= bud


def test_owner_arrays_cover_what_the_backends_report(tiny_bundle):
    """The arrays measured for the window cache and the kernel scratch are all the bytes those
    objects say they hold (an array added to either without this list growing would be missed)."""
    from flashinfer_local.kernels import RecordKernel
    from flashinfer_local.runtime.backend import arrays_of as _arrays
    from storage.window_cache import LayerWindow
    b = Bundle(tiny_bundle("llama", "f16"))
    w = LayerWindow(b.config.d_ff, b.layout.record_bytes, 50, 4)
    assert sum(a.nbytes for a in _arrays(w)) == w.nbytes
    k = RecordKernel(b.layout, "f16", b.config.d_model, b.config.d_ff)
    assert sum(a.nbytes for a in _arrays(k)) == k.nbytes


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_all_in_dram_attribution(smollm_bundle, dtype):
    """int8/int4 records in DRAM: the records, the int8 down matrices and their scratch are all
    attributed (an owner the profile missed would land in "other", past the tolerance)."""
    path = smollm_bundle(dtype)
    d = _profile(path, n=3, offload="none")
    _check_attribution(d)
    last, f = d["snapshots"][-1], d["facts"]
    assert f["offload"] == "none"
    assert last["owners"]["ffn_dram"] == f["planned"]["ffn_dram_bytes"] == f["plan"]["ffn_dram_bytes"]
    assert last["owners"]["buffers"] <= f["planned"]["buffer_bytes"] == f["plan"]["buffer_bytes"]
    assert last["owners"]["window"] == 0


@pytest.mark.parametrize("draft", ["model", "self"])
def test_a_draft_is_attributed(tiny_bundle, draft):
    """The draft model's weights or the self draft's KV cache are an owner of their own."""
    d = str(tiny_bundle("qwen2", "int8")) if draft == "model" else "self"
    prof = _profile(tiny_bundle("llama", "f32"), n=8, offload="window", draft=d)
    _check_attribution(prof)
    last = prof["snapshots"][-1]
    assert last["owners"]["draft"] > 0
    assert prof["facts"]["plan"]["draft_bytes"] > 0
    assert prof["stats"]["speculation"]["draft"]
