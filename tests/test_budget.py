"""The budget plan against what the engine really allocates, owner by owner, in every mode.

budget.plan_budget is the one owner of the DRAM budget: every size in it is computed from the same
facts the allocating code uses. Here each mode is built on tiny models and each owner's arrays (as
the backends report them, counted from the arrays themselves) are compared with the plan: exactly,
except for the parts the plan holds for transients (a prefill chunk in flight, a window plan's
temporaries), which are subtracted by name.
"""
import pytest

from flashinfer_local.runtime import budget
from flashinfer_local.runtime.backend import array_bytes
from flashinfer_local.runtime.engine import Engine
from storage import window_cache as wc
from storage.reader import Bundle

CTX = 48


def _engine(path, offload):
    b = Bundle(path)
    cfg = b.config
    if offload == "window":      # a cache of about half of each layer
        extra = (cfg.d_ff // 2) * cfg.n_layers * (b.layout.record_bytes + 24)
        return Engine(path, offload="window", dram_budget=budget.minimum_budget(b, CTX) + extra, context=CTX)
    return Engine(path, offload=offload, context=CTX)


@pytest.mark.parametrize("offload", ["none", "window", "naive"])
@pytest.mark.parametrize("arch,dtype", [("llama", "f32"), ("llama", "f16"), ("opt", "f16"), ("llama", "int8"),
                                        ("llama", "int4"), ("opt", "int4"), ("qwen2", "int8"),
                                        ("llama", "f16+split"), ("llama", "int8+split"), ("llama", "int4+split")])
def test_allocated_is_planned_owner_by_owner(tiny_bundle, arch, dtype, offload):
    path = tiny_bundle(arch, dtype.removesuffix("+split"), dtype.endswith("+split"))
    eng = _engine(path, offload)
    plan, cfg, s = eng.plan, eng.config, budget.Sizes.of(eng.bundle)
    assert plan.mode == offload
    got = {o: array_bytes(a) for o, a in eng.resident_arrays().items()}
    if offload == "none":
        assert got["ffn_dram"] == plan.ffn_dram_bytes
        assert got["buffers"] == plan.buffer_bytes
        assert plan.cache_bytes == 0 and "window" not in got
    else:
        assert plan.ffn_dram_bytes == 0 and "ffn_dram" not in got
        assert got["buffers"] == budget.stream_allocated_buffer_bytes(s) <= plan.buffer_bytes
        scratch = cfg.n_layers * cfg.d_ff * wc.PLAN_SCRATCH_BYTES_PER_NEURON
        if offload == "window":
            assert 0 < plan.cache_rows_per_layer < cfg.d_ff
            assert got["window"] == plan.cache_bytes - scratch
        else:
            assert got["window"] == plan.cache_bytes == 0
    # the KV cache at the planned context: keys and values per layer and the rotary tables
    session = eng.session(eng.context)
    tables = sum(t.numel() * t.element_size() for t in session.cache.tables)
    assert session.cache.nbytes + tables == plan.kv_bytes
    assert plan.selector_bytes == eng.selector.nbytes == 0
    # the dense part: the mapped file, or for an untied embedding only the rows a context touches
    dense_file = (eng.bundle.path / "dense.safetensors").stat().st_size
    assert plan.dense_bytes == dense_file if cfg.tie_embeddings else plan.dense_bytes <= dense_file
    assert plan.total_bytes == sum(plan.owners().values())
    eng.close()


def test_the_mode_is_chosen_by_the_plan(tiny_bundle):
    path = tiny_bundle("llama", "f16")
    b = Bundle(path)
    in_dram = budget.minimum_budget(b, CTX, "none")
    assert budget.plan_budget(b, None, CTX).mode == "none"
    assert budget.plan_budget(b, in_dram, CTX).mode == "none"
    stream_min = budget.minimum_budget(b, CTX)
    big = max(in_dram, stream_min) + (1 << 20)
    assert budget.plan_budget(b, big, CTX, "window").mode == "window"
    if in_dram - 1 >= stream_min:
        assert budget.plan_budget(b, in_dram - 1, CTX).mode == "window"


def test_window_metadata_comes_from_the_window_cache():
    """The budget asks storage.window_cache what a window allocates; a LayerWindow agrees."""
    for evict in wc.EVICT:
        w = wc.LayerWindow(100, 64, 30, 4, evict=evict)
        assert w.nbytes == wc.window_bytes(100, 64, 30, evict)


def test_a_selector_is_planned_at_its_size(tiny_bundle, tmp_path):
    import shutil

    from flashinfer_local.workflows.calibrate import calibrate
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle("llama", "f16"), dst)
    calibrate(dst, "threshold", tokens=600, seed=0)
    for offload in ("none", "window"):
        eng = Engine(dst, offload=offload, selector="predictor", predictor="threshold", context=CTX)
        assert eng.plan.selector_bytes == eng.selector.nbytes > 0
        eng.close()
