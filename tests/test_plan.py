"""`plan` end to end on a tiny model: a stored placement is followed by run (same tokens, logits
within float tolerance), the device path with --device cpu matches the all-CPU result, a stale or
damaged plan is refused, and the budget counts it."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flashinfer_local.cli import main
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.workflows.calibrate import calibrate
from flashinfer_local.workflows.plan import make_plan
from predictors import placement as pl
from predictors import plan_file
from storage import window_cache as wc
from storage.errors import FlashinferError

from conftest import rewrite_manifest

CTX = 128
IDS = [1, 5, 9, 14, 3, 7, 22, 8]


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("plan") / "b"
    shutil.copytree(tiny_bundle("llama", "f32"), dst)
    calibrate(dst, "threshold", tokens=600, seed=0)
    return dst


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")      # one cost cache for the module's copies


@pytest.fixture
def bundle(calibrated, tmp_path, monkeypatch, home):
    monkeypatch.setenv("FLASHINFER_LOCAL_HOME", str(home))
    dst = tmp_path / "b"
    shutil.copytree(calibrated, dst)
    return dst


def _budget(path, extra=200 << 10):
    from flashinfer_local.runtime.budget import minimum_budget, predictor_bytes
    from storage.reader import Bundle
    b = Bundle(path)
    try:
        return minimum_budget(b, CTX, "window", predictor_bytes(b, "threshold")) + extra
    finally:
        b.close()


def _logits(path, **kw):
    eng = Engine(path, offload="window", context=CTX, selector="predictor", **kw)
    try:
        out = []
        s = eng.session(len(IDS) + 8)
        out.append(s.append(IDS)[-1])
        for t in [4, 11, 2, 19]:
            out.append(s.append([t])[-1])
        return torch.stack(out), eng.memory_facts()
    finally:
        eng.close()


@pytest.mark.parametrize("evict", wc.EVICT)
def test_window_pinned_rows_stay(evict):
    w = wc.LayerWindow(50, 8, 20, 2, pinned=np.array([3, 7, 40]), evict=evict)
    assert w.n_pinned == 3 and list(w.resident_ids) == [3, 7, 40]
    for t, sel in enumerate([[1, 2, 3], [5, 6, 9, 10, 11], list(range(12, 40)), [7, 8]]):
        p = w.plan(t, np.array(sel))
        w.check()
        assert list(w.ids[:3]) == [3, 7, 40]
        assert set(p.hit_ids) >= {3, 7} & set(sel)


def test_a_plan_is_followed_and_changes_nothing(bundle):
    budget = _budget(bundle)
    rep = make_plan(bundle, budget, {"selector": "predictor", "context": CTX})
    assert rep["objective_ms"] <= rep["greedy_objective_ms"] + 1e-9
    assert {"objective_ms", "greedy_objective_ms", "solve_s", "predicted_tokens_per_s"} <= set(rep)
    pinned = sum(r["pinned"] for r in rep["layers"])
    assert pinned > 0
    with_plan, facts = _logits(bundle, dram_budget=budget)
    without, facts0 = _logits(bundle, dram_budget=budget, placement="none")
    assert facts["placement"]["pinned_neurons"] == pinned and "placement" not in facts0
    assert torch.allclose(with_plan, without, atol=1e-4, rtol=1e-4)
    assert (with_plan.argmax(-1) == without.argmax(-1)).all()


def _device_plan(bundle, device):
    from storage.reader import Bundle
    b = Bundle(bundle)
    cfg = b.config
    rng = np.random.default_rng(0)
    tiers = [np.where(rng.random(cfg.d_ff) < 0.5, pl.DEVICE, pl.STREAM).astype(np.int8) for _ in range(cfg.n_layers)]
    tiers[0][:4] = pl.PINNED
    plan = pl.Placement(tiers, [0] * cfg.n_layers, 1.0, [0.0] * cfg.n_layers, "test")
    plan_file.save(bundle, b.manifest, plan, {"device": device, "predictor": None, "dram_budget": None,
                                              "layers": plan.counts()})
    b.close()
    return tiers


def test_device_cpu_matches_all_cpu(bundle):
    """Half of each layer's neurons on a CPU "device": the partial sums give the all-CPU output."""
    tiers = _device_plan(bundle, "cpu")
    budget = _budget(bundle, 1 << 20)
    placed, facts = _logits(bundle, dram_budget=budget)
    cpu, _ = _logits(bundle, dram_budget=budget, placement="none")
    assert facts["placement"]["device_neurons"] == sum(int((t == pl.DEVICE).sum()) for t in tiers)
    assert facts["placement"]["device_bytes"] > 0
    assert torch.allclose(placed, cpu, atol=1e-4, rtol=1e-4)
    assert (placed.argmax(-1) == cpu.argmax(-1)).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_matches_all_cpu(bundle):
    """The same with the device neurons on CUDA (f16 there: float16 rounding)."""
    _device_plan(bundle, "cuda")
    budget = _budget(bundle, 1 << 20)
    placed, facts = _logits(bundle, dram_budget=budget)
    cpu, _ = _logits(bundle, dram_budget=budget, placement="none")
    assert facts["placement"]["device"] == "cuda"
    assert torch.allclose(placed, cpu, atol=2e-2, rtol=2e-2)


def test_a_cuda_plan_without_cuda_is_refused(bundle):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _device_plan(bundle, "cuda")
    with pytest.raises(FlashinferError, match="does not have; re-run"):
        Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=_budget(bundle, 1 << 20))


def test_plan_with_a_cpu_device(bundle):
    budget = _budget(bundle, 400 << 10)
    rep = make_plan(bundle, budget, {"selector": "predictor", "context": CTX}, gpu_mem=64 << 10, device="cpu")
    assert rep["device"] == "cpu" and rep["costs"]["device_s_per_record"] > 0
    assert sum(r["device"] for r in rep["layers"]) * rep["costs"]["device_bytes_per_record"] <= 64 << 10
    eng = Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=budget)
    assert eng.plan.total_bytes <= budget
    eng.close()


def test_the_budget_counts_the_plan(bundle):
    budget = _budget(bundle)
    make_plan(bundle, budget, {"selector": "predictor", "context": CTX})
    with pytest.raises(FlashinferError, match="cannot hold the bundle's stored placement"):
        Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=budget - (150 << 10))
    eng = Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=budget)
    assert eng.plan.total_bytes <= budget
    assert eng.resident()["window_cache_bytes"] == eng.plan.cache_bytes - cfg_scratch(eng)
    eng.close()


def cfg_scratch(eng):
    c = eng.config
    return c.n_layers * c.d_ff * wc.PLAN_SCRATCH_BYTES_PER_NEURON


def test_a_stale_plan_is_refused(bundle):
    budget = _budget(bundle)
    make_plan(bundle, budget, {"selector": "predictor", "context": CTX})
    from predictors import store                               # a recalibrated predictor: new figures
    from storage.reader import Bundle
    b = Bundle(bundle)
    tensors, meta = store.load(bundle, "threshold", b.config)
    b.close()
    tensors["keep.0"] = (tensors["keep.0"] * 0.5).astype(tensors["keep.0"].dtype)
    store.save(bundle, "threshold", tensors, {k: v for k, v in meta.items() if k not in ("format_version", "kind")})
    with pytest.raises(FlashinferError, match="stale.*plan .* again"):
        Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=budget)
    make_plan(bundle, budget, {"selector": "predictor", "context": CTX})
    m = json.loads((bundle / "manifest.json").read_text())
    m["neuron_order"] = "reordered-elsewhere"
    rewrite_manifest(bundle, m)
    with pytest.raises(FlashinferError, match="stale"):
        Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=budget)


def test_a_damaged_plan_is_refused(bundle):
    make_plan(bundle, _budget(bundle), {"selector": "predictor", "context": CTX})
    p = plan_file.plan_path(bundle)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(FlashinferError, match="damaged|unreadable"):
        Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=_budget(bundle))
    eng = Engine(bundle, offload="window", context=CTX, selector="predictor", dram_budget=_budget(bundle),
                 placement="none")
    eng.close()


def test_a_plan_with_a_bad_header_is_refused(bundle):
    from predictors import store
    from storage.reader import Bundle
    make_plan(bundle, _budget(bundle), {"selector": "predictor", "context": CTX})
    b = Bundle(bundle)
    tiers, rows, meta = plan_file.load(bundle, b.manifest, b.config.n_layers, b.config.d_ff)
    tensors = {f"tier.{i}": t for i, t in enumerate(tiers)} | {"window_rows": np.asarray(rows, np.int32)}
    for bad in ({"device": 5}, {"device": "tpu"}, {"dram_budget": "lots"}, {"predictor": 3}):
        store.save_atomic(plan_file.plan_path(bundle), tensors, "placement", {**meta, **bad})
        with pytest.raises(FlashinferError, match="malformed placement header"):
            plan_file.load(bundle, b.manifest, b.config.n_layers, b.config.d_ff)
    b.close()


def test_plan_cli(bundle, tmp_path):
    r = CliRunner().invoke(main, ["plan", str(bundle), "--dram-budget", f"{_budget(bundle)}B", "--selector",
                                  "predictor", "--context", str(CTX), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "expected" in r.output and "greedy" in r.output
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["costs_measured_now"] is False or rep["costs_measured_now"] is True
    r = CliRunner().invoke(main, ["inspect", str(bundle)])
    assert "placement   " in r.output and "pinned in DRAM" in r.output
    r = CliRunner().invoke(main, ["inspect", str(bundle), "--json"])
    assert json.loads(r.output)["placement"]["pinned_neurons"] > 0
    for args, msg in [(["--dram-budget", "1KiB"], "below"), (["--dram-budget", "1GiB", "--device", "cpu"], "--gpu-mem"),
                      (["--dram-budget", "1GiB", "--selector", "oracle"], "all or predictor")]:
        r = CliRunner().invoke(main, ["plan", str(bundle), *args, "--context", str(CTX)])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("method", ["coact", "frequency"])
def test_reorder_keeps_the_model(bundle, method):
    budget = _budget(bundle)
    before, _ = _logits(bundle, dram_budget=budget, placement="none")
    dense_before, _ = _logits(bundle)                      # all in DRAM
    rep = make_plan(bundle, budget, {"selector": "predictor", "context": CTX}, reorder=method)
    assert rep["reorder"]["method"] == method and rep["unreordered_objective_ms"] > 0 and rep["read_factor"] > 0
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["neuron_order"] == rep["reorder"]["neuron_order"] != "original"
    from storage.reader import Bundle
    b = Bundle(bundle)
    assert b.verify() == []
    tiers, _, stored = plan_file.load(bundle, b.manifest, b.config.n_layers, b.config.d_ff)
    assert stored["reorder"]["neuron_order"] == m["neuron_order"]
    for t in tiers:                                        # pinned neurons first, contiguous
        n = int((t == pl.PINNED).sum())
        assert (t[:n] == pl.PINNED).all()
    b.close()
    after, facts = _logits(bundle, dram_budget=budget, placement="none")
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    assert (before.argmax(-1) == after.argmax(-1)).all()
    placed, facts = _logits(bundle, dram_budget=budget)
    assert facts["placement"]["pinned_neurons"] > 0
    assert torch.allclose(before, placed, atol=1e-4, rtol=1e-4)
    dense_after, _ = _logits(bundle)
    assert torch.allclose(dense_before, dense_after, atol=1e-4, rtol=1e-4)


def test_an_interrupted_reorder_leaves_the_bundle(bundle, monkeypatch):
    from storage import st_writer
    budget = _budget(bundle)
    make_plan(bundle, budget, {"selector": "predictor", "context": CTX})
    files = {f.name: f.read_bytes() for f in bundle.iterdir()}
    calls = {"n": 0}
    real = st_writer.SafetensorsWriter.write

    def write(self, name, a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, name, a)
    monkeypatch.setattr(st_writer.SafetensorsWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        make_plan(bundle, budget, {"selector": "predictor", "context": CTX}, reorder="coact")
    assert {f.name: f.read_bytes() for f in bundle.iterdir()} == files
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".b.")]


def test_a_predictor_of_another_order_is_refused(bundle):
    old = (bundle / "predictor-threshold.safetensors").read_bytes()
    make_plan(bundle, _budget(bundle), {"selector": "predictor", "context": CTX}, reorder="frequency")
    (bundle / "predictor-threshold.safetensors").write_bytes(old)
    with pytest.raises(FlashinferError, match="another order"):
        Engine(bundle, context=CTX, selector="predictor")


def test_reorder_int8_in_dram(tiny_bundle, tmp_path, monkeypatch):
    """int8 records: streamed, a reordered bundle computes the same sums in another order; all in
    DRAM, the down matrix is requantized in groups of 32 neurons, which reordering regroups, so the
    logits move by the int8 rounding of the down weights (bounded here) and greedy tokens stay."""
    monkeypatch.setenv("FLASHINFER_LOCAL_HOME", str(tmp_path / "home"))
    dst = tmp_path / "q"
    shutil.copytree(tiny_bundle("llama", "int8"), dst)
    calibrate(dst, "threshold", tokens=600, seed=0)
    budget = _budget(dst)
    s_before, _ = _logits(dst, dram_budget=budget, placement="none")
    d_before, _ = _logits(dst)
    make_plan(dst, budget, {"selector": "predictor", "context": CTX}, reorder="coact")
    s_after, _ = _logits(dst, dram_budget=budget, placement="none")
    d_after, _ = _logits(dst)
    assert torch.allclose(s_before, s_after, atol=1e-3, rtol=1e-3)
    scale = d_before.abs().max()
    assert (d_before - d_after).abs().max() < 0.05 * scale
    assert (d_before.argmax(-1) == d_after.argmax(-1)).all()


def test_layer_sparsities_least_loss_for_the_mean():
    """The greedy spread of a mean sparsity over layers is the least-loss one (convex losses),
    checked against every combination."""
    import itertools

    from predictors import calibration as cal
    from predictors.store import KEEP_GRID
    rng = np.random.default_rng(0)
    G = len(KEEP_GRID)
    lost = np.cumsum(np.sort(rng.uniform(0, 0.02, (3, G)), axis=1) * rng.uniform(0.5, 2, (3, 1)), axis=1)
    lost -= lost[:, :1]
    for target in (0.1, 0.2, 0.35):
        got = cal.layer_sparsities(lost, target)
        assert got.mean() >= target - 1e-9
        steps = int(round(got.mean() / 0.05 * 3))
        best = min(sum(lost[i, c[i]] for i in range(3)) for c in itertools.product(range(G), repeat=3)
                   if sum(c) == steps)
        idx = np.round(got / 0.05).astype(int)
        assert sum(lost[i, idx[i]] for i in range(3)) == pytest.approx(best)


def test_calibrate_stores_layer_shares_and_the_selector_uses_them(bundle):
    from predictors import store
    from flashinfer_local.runtime.selection import PredictorSelector
    from storage.reader import Bundle
    meta = store.read_meta(bundle, "threshold")
    assert 0 <= meta["layer_default_sparsity"] < 1 and len(meta["layer_sparsities"]) == meta["layers"][-1]["layer"] + 1
    b = Bundle(bundle)
    sel = PredictorSelector(b, "threshold", sparsity=0.3)
    assert sel.shares == "layer" and np.mean(sel.layer_sparsity) >= 0.3 - 1e-9
    uni = PredictorSelector(b, "threshold", sparsity=0.3, shares="uniform")
    assert uni.layer_sparsity == [0.3] * b.config.n_layers
    assert PredictorSelector(b, "threshold").sparsity == meta["layer_default_sparsity"]
    b.close()


def test_an_unwritable_bundle_is_one_line(bundle, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    r = CliRunner().invoke(main, ["plan", str(bundle), "--dram-budget", f"{_budget(bundle)}B", "--selector",
                                  "predictor", "--context", str(CTX)])
    assert r.exit_code == 1 and "cannot write" in r.output and "Permission denied" in r.output, r.output
    assert not plan_file.plan_path(bundle).exists()
