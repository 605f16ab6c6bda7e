"""The gate-split layout (``convert --gate-split``, format version 4): gate rows as dense matrices,
records of up and down only. An f32 split bundle computes what the unsplit one does in every
offload mode; a quantized one agrees with itself across modes (its gate is q8, not the records'
codes); the threshold predictor scores with the engine's gate values and holds nothing of its own;
a streamed token reads only the smaller records; reorder, placement and the self draft keep the
model."""
import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flashinfer_local.cli import main
from flashinfer_local.runtime.budget import predictor_bytes
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.workflows.calibrate import calibrate
from flashinfer_local.workflows.plan import make_plan
from storage import format as fmt
from storage.convert import convert
from storage.errors import FlashinferError
from storage.reader import Bundle

IDS = [1, 5, 9, 14, 3, 7, 22, 8, 30, 2, 17, 40, 6, 11, 12, 25, 33, 4, 19, 21]
CTX = 64
MODES = [dict(offload="none"), dict(offload="window"), dict(offload="naive")]


@pytest.fixture(scope="module")
def split(tiny_ckpt, tmp_path_factory):
    """Factory: dtype -> (unsplit bundle, split bundle) of the tiny llama."""
    made = {}

    def get(dtype):
        if dtype not in made:
            d = tmp_path_factory.mktemp(f"split_{dtype}")
            made[dtype] = (convert(tiny_ckpt("llama"), d / "a", dtype=dtype, progress=False),
                           convert(tiny_ckpt("llama"), d / "b", dtype=dtype, progress=False, gate_split=True))
        return made[dtype]
    return get


def _run(path, **kw):
    """Prefill logits, then four decode steps and one 3-token verification-sized pass."""
    eng = Engine(path, context=CTX, **kw)
    try:
        s = eng.session(len(IDS) + 12)
        out = [s.append(IDS)]
        for t in (4, 11, 2, 19):
            out.append(s.append([t]))
        out.append(s.append([7, 8, 9]))
        return torch.cat(out), eng
    finally:
        eng.close()


def test_layout_and_format(split):
    a, b = (Bundle(p) for p in split("int8"))
    assert b.format_version == fmt.FORMAT_VERSION == 5 and b.gate_split and not a.gate_split
    assert b.layout.vectors == ["up", "down"] and a.layout.vectors == ["gate", "up", "down"]
    assert b.layout.payload_bytes == a.layout.payload_bytes - a.layout.field("gate").nbytes - 4   # and its scales
    g = b.dense("layers.0.gate")
    assert g.dtype == np.int8 and g.shape == (b.config.d_ff, b.config.d_model)
    want = a.field_f32(a.read_ffn_layer(0), "gate")          # the same q8 codes as the records'
    np.testing.assert_allclose(b.vector_f32(0, b.read_ffn_layer(0), "gate"), want, atol=1e-6)
    ids = np.array([3, 9, 100])
    np.testing.assert_allclose(b.vector_f32(0, b.read_ffn_layer(0)[ids], "gate", ids), want[ids], atol=1e-6)
    assert Bundle(split("f32")[1]).dense("layers.0.gate").dtype == np.float32
    a.close(), b.close()


@pytest.mark.parametrize("kw", MODES, ids=lambda k: k["offload"])
def test_f32_split_computes_the_unsplit_model(split, kw):
    a, b = split("f32")
    ref, _ = _run(a, **kw)
    got, _ = _run(b, **kw)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["f16", "int8", "int4"])
def test_a_quantized_split_agrees_across_modes(split, dtype, monkeypatch):
    """Its gate is q8 (int4 records' gate is q4): it is another model than the unsplit bundle, by
    a q8 gate's rounding; the modes compute it alike (the DRAM mode with whole records, as the
    streaming modes compute), and near the unsplit one."""
    from flashinfer_local.runtime import dram
    monkeypatch.setattr(dram, "SPLIT_DOWN", False)
    a, b = split(dtype)
    outs = [_run(b, **kw)[0] for kw in MODES]
    for o in outs[1:]:
        assert (o.argmax(-1) == outs[0].argmax(-1)).all()
        assert torch.allclose(o, outs[0], atol=0.05 * outs[0].abs().max())
    ref, _ = _run(a, offload="none")
    assert (outs[0] - ref).abs().max() < 0.15 * ref.abs().max()


def test_streamed_tokens_read_only_up_and_down(split):
    a, b = split("f32")                      # (f32: the tiny records are 1024 and 512 bytes)
    ra, rb = Bundle(a).layout.record_bytes, Bundle(b).layout.record_bytes
    na = Engine(a, offload="naive", context=CTX)
    nb = Engine(b, offload="naive", context=CTX)
    for e in (na, nb):
        e.logits(IDS[:4])
    fa, fb = na.counters().flash_bytes_read, nb.counters().flash_bytes_read
    assert rb < ra and fa > 0 and fb * ra == fa * rb
    na.close(), nb.close()


@pytest.fixture(scope="module")
def calibrated(split, tmp_path_factory):
    dst = tmp_path_factory.mktemp("split_cal") / "b"
    shutil.copytree(split("f32")[1], dst)
    calibrate(dst, "threshold", tokens=600, seed=0)
    return dst


def test_threshold_scores_with_the_engines_gate(calibrated):
    b = Bundle(calibrated)
    assert predictor_bytes(b, "threshold") == 0
    b.close()
    eng = Engine(calibrated, offload="window", context=CTX, selector="predictor", sparsity=0.3)
    assert eng.selector.nbytes == 0 and eng.memory_facts()["selector_bytes"] == 0
    x = torch.randn(3, eng.config.d_model)
    gate = x @ torch.from_numpy(np.asarray(Bundle(calibrated).dense("layers.1.gate"))).T
    assert torch.equal(eng.selector.mask(1, x, gate), eng.selector.mask(1, x))   # its own rows: the same
    full = eng.logits(IDS)
    assert torch.isfinite(full).all()
    eng.close()


def test_reorder_of_a_split_bundle_keeps_the_model(calibrated, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_LOCAL_HOME", str(tmp_path / "home"))
    dst = tmp_path / "b"
    shutil.copytree(calibrated, dst)
    kw = dict(selector="predictor", offload="window")
    before, _ = _run(dst, **kw)
    dense_before, _ = _run(dst, selector="predictor", offload="none")
    from flashinfer_local.runtime.budget import minimum_budget
    with contextlib.closing(Bundle(dst)) as b:
        budget = minimum_budget(b, CTX, "window") + (400 << 10)
    make_plan(dst, budget, {"selector": "predictor", "context": CTX}, reorder="coact")
    b = Bundle(dst)
    assert b.verify() == [] and b.manifest["neuron_order"] != "original"
    b.close()
    after, _ = _run(dst, **kw, placement="none")
    placed, _ = _run(dst, **kw, dram_budget=budget)
    dense_after, _ = _run(dst, selector="predictor", offload="none")
    for got, want in ((after, before), (placed, before), (dense_after, dense_before)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_device_part_of_a_split_bundle(split, tmp_path):
    from predictors import placement as pl
    from predictors import plan_file
    dst = tmp_path / "b"
    shutil.copytree(split("f32")[1], dst)
    b = Bundle(dst)
    rng = np.random.default_rng(0)
    tiers = [np.where(rng.random(b.config.d_ff) < 0.5, pl.DEVICE, pl.STREAM).astype(np.int8)
             for _ in range(b.config.n_layers)]
    plan = pl.Placement(tiers, [0] * b.config.n_layers, 1.0, [0.0] * b.config.n_layers, "test")
    plan_file.save(dst, b.manifest, plan, {"device": "cpu", "predictor": None, "dram_budget": None,
                                           "layers": plan.counts()})
    b.close()
    placed, _ = _run(dst, offload="window")
    cpu, _ = _run(dst, offload="window", placement="none")
    assert torch.allclose(placed, cpu, atol=1e-4, rtol=1e-4)


def test_self_draft_on_a_split_bundle(split):
    b = split("f32")[1]
    plain = Engine(b, offload="window", context=CTX)
    spec = Engine(b, offload="window", context=CTX, draft="self")
    from flashinfer_local.runtime.sampling import SamplingParams
    greedy = SamplingParams(temperature=0)
    want = [s.token_id for s in plain.generate(IDS, 12, greedy, stop_at_eos=False)]
    steps = list(spec.generate(IDS, 12, greedy, stop_at_eos=False))
    assert [s.token_id for s in steps] == want and steps[-1].stats.drafted_tokens > 0
    plain.close(), spec.close()


def test_gate_split_errors_and_inspect(tiny_ckpt, split, tmp_path):
    with pytest.raises(FlashinferError, match="gated FFN"):
        convert(tiny_ckpt("opt"), tmp_path / "o", dtype="f16", progress=False, gate_split=True)
    r = CliRunner().invoke(main, ["convert", str(tiny_ckpt("opt")), str(tmp_path / "o2"), "--gate-split"])
    assert r.exit_code != 0 and "gated FFN" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o2").exists()
    r = CliRunner().invoke(main, ["inspect", str(split("int8")[1])])
    assert r.exit_code == 0 and "gate split out as dense q8" in r.output, r.output
    m = json.loads((split("int8")[1] / "manifest.json").read_text())
    assert m["ffn"]["layout"]["gate_split"] is True and m["format_version"] == fmt.FORMAT_VERSION


def test_real_smollm2_split_in_f32_is_the_same_model(smollm_bundle, tmp_path):
    """SmolLM2-135M (real weights): the f32 split bundle gives the unsplit bundle's logits, all in
    DRAM and streamed."""
    from conftest import smollm_gguf
    a = smollm_bundle("f32")
    b = convert(smollm_gguf(), tmp_path / "s", dtype="f32", progress=False, gate_split=True)
    ids = [1, 504, 3458, 314, 260, 1789, 30, 1070, 253, 2931, 28]
    ref = Engine(a, context=CTX).logits(ids)
    for kw in (dict(offload="none"), dict(offload="window")):
        got = Engine(b, context=CTX, **kw).logits(ids)
        assert torch.allclose(got, ref, atol=2e-3, rtol=1e-4), (kw, float((got - ref).abs().max()))
