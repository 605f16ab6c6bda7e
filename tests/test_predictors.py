"""Sparsity predictors: calibration, storage, selection and evaluation on tiny random models.

The references: the exact model (dense FFN, every neuron), transformers' forward of the same
checkpoint for perplexity, and a planted low-rank pattern the predictor must recover.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashinfer_local.workflows.calibrate import calibrate
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.measure.evaluate import evaluate, held_out_ids, perplexity
from flashinfer_local.runtime.sampling import SamplingParams
from predictors import calibration as cal
from predictors import lowrank, store
from storage.errors import FlashinferError
from storage.reader import Bundle
from tiny_models import reference_logits, reference_model

TOKENS = 1024


@pytest.fixture(scope="module")
def calibrated(tiny_bundle, tmp_path_factory):
    """Factory: (arch, kind) -> a copy of the tiny bundle with that predictor calibrated (seed 0)."""
    import shutil
    made = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in made:
            dst = tmp_path_factory.mktemp(f"cal_{arch}_{kind}") / "b"
            shutil.copytree(tiny_bundle(arch), dst)
            made[arch, kind] = (dst, calibrate(dst, kind, tokens=TOKENS, seed=0))
        return made[arch, kind]
    return get


def _greedy(eng: Engine, n: int = 24) -> list[int]:
    st = None
    for step in eng.generate("def add(a, b):", max_tokens=n, stop_at_eos=False,
                             sampling=SamplingParams(temperature=0)):
        st = step.stats
    return list(st.token_ids)


def test_calibration_is_deterministic_with_a_seed(calibrated, tmp_path, tiny_bundle):
    import shutil
    path, rep = calibrated("llama", "lowrank")
    again = tmp_path / "b"
    shutil.copytree(tiny_bundle("llama"), again)
    rep2 = calibrate(again, "lowrank", tokens=TOKENS, seed=0)
    a, _ = store.load(path, "lowrank", Bundle(path).config)
    b, _ = store.load(again, "lowrank", Bundle(again).config)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert rep["default_sparsity"] == rep2["default_sparsity"]
    assert [r["rank"] for r in rep["layers"]] == [r["rank"] for r in rep2["layers"]]


def test_stored_facts(calibrated):
    path, rep = calibrated("qwen2", "threshold")
    cfg = Bundle(path).config
    tensors, meta = store.load(path, "threshold", cfg)
    assert meta["kind"] == "threshold" and meta["train_tokens"] + meta["val_tokens"] <= TOKENS
    for i in range(cfg.n_layers):
        f = tensors[f"freq.{i}"]
        assert f.shape == (cfg.d_ff,) and 0 <= f.min() and f.max() <= 1
        assert abs(f.mean() - 0.5) < 0.1          # active at the 0.5 target: about half on average
        assert np.all(np.diff(tensors[f"cutoffs.{i}"]) >= 0)
    assert 0 <= meta["default_sparsity"] < 1
    assert not list(path.glob(".*tmp"))            # the temporary file was renamed away


def test_lowrank_recovers_a_planted_pattern():
    # the gate is exactly rank 6: from rank 6 on, the predictor must pick what the exact gate picks
    g = torch.Generator().manual_seed(0)
    d, d_ff, n = 48, 128, 3000
    gate = torch.randn(d_ff, 6, generator=g) @ torch.randn(6, d, generator=g) / 3
    up = torch.randn(d_ff, d, generator=g) / 7
    x = torch.randn(n, d, generator=g) * torch.linspace(0.3, 2, d)         # anisotropic inputs
    w = {"gate": gate, "up": up}
    a = cal.activations(x, w, "silu").abs()
    xt, xv, at, av = x[:2500], x[2500:], a[:2500], a[2500:]
    thr = cal.threshold(at, 0.5, True)
    # what the exact gate picks (|silu(gate . x)| above its cutoff) is the most a gate stand-in can
    exact = cal.selection_quality(cal.gate_scores(xv, w, "silu"),
                                  float(cal.cutoff_table(cal.gate_scores(xt, w, "silu"))[50]), av, thr)
    m, cut, rep = lowrank.fit(xt, at, xv, av, thr, 0.5, gate, None, exact["recall"] - 0.005, seed=0,
                              ranks=(2, 4, 8, 16))
    assert rep["rank"] == 8 and rep["reached"]                           # 2 and 4 cannot, 8 can
    assert rep["recall"] == pytest.approx(exact["recall"], abs=0.005)
    assert [t["rank"] for t in rep["tried"]] == [2, 4, 8]
    assert rep["tried"][1]["recall"] < exact["recall"] - 0.02


def test_relu_model_predicts_the_non_zero_neurons(calibrated):
    path, rep = calibrated("opt", "lowrank")
    assert rep["natural_sparsity"] > 0.2             # a ReLU model has exact zeros
    for r in rep["layers"]:
        assert r["threshold"] == 0.0                  # active means non-zero
        assert r["precision"] > 0.5
    # the threshold predictor computes the activation itself: recall 1 of the non-zeros
    _, rep_t = calibrated("opt", "threshold")
    assert all(r["recall"] == pytest.approx(1.0) for r in rep_t["layers"])
    assert rep_t["default_sparsity"] >= round(rep_t["natural_sparsity"], 2)


@pytest.mark.parametrize("offload", ["none", "window"])
def test_recall_one_selection_reproduces_the_exact_tokens(calibrated, offload):
    # OPT + threshold at its natural sparsity keeps exactly the non-zero neurons: the skipped ones
    # contribute 0, so the tokens are the exact model's while fewer neurons are computed and read
    path, rep = calibrated("opt", "threshold")
    sparsity = 0.0                  # cutoff: the smallest score seen, 0 (exact zeros): keep the non-zeros
    exact = Engine(path, offload="none")
    want = _greedy(exact)
    exact.close()
    eng = Engine(path, offload=offload, selector="predictor", predictor="threshold", sparsity=sparsity,
                 dram_budget=None if offload == "none" else 1 << 30)
    got = _greedy(eng)
    assert got == want
    if offload == "window":
        c = eng.ffn.counters()
        assert c.lookups < 0.9 * (len(want) + 1) * eng.config.n_layers * eng.config.d_ff
    eng.close()


def test_predictor_selects_fewer_neurons_as_sparsity_rises(calibrated):
    path, _ = calibrated("llama", "lowrank")
    eng = Engine(path, offload="naive", selector="predictor", sparsity=0.2, dram_budget=1 << 30)
    # seeded, and eight tokens (the union is selected): one unseeded random x sometimes fell below
    # every cutoff at 0.8, which calibration set on real hidden states (CI, session 27)
    x = torch.randn(8, eng.config.d_model, generator=torch.Generator().manual_seed(0))
    n = []
    for s in (0.2, 0.5, 0.8):
        eng.selector.set_sparsity(s)
        n.append(len(eng.selector.select(0, x)))
    assert n[0] > n[1] > n[2] > 0
    with pytest.raises(FlashinferError, match="--sparsity"):
        eng.selector.set_sparsity(1.5)
    eng.close()


def test_eval_perplexity_matches_transformers(calibrated, tiny_ckpt):
    path, _ = calibrated("llama", "threshold")
    eng = Engine(path, offload="none", selector="predictor", predictor="threshold")
    parts = held_out_ids(eng.tokenizer, None, 400)
    res = evaluate(eng, [0.0, 0.5], parts, gen_tokens=16, prompt_tokens=16, window=128, timing_tokens=2)
    ref = reference_model(tiny_ckpt("llama"))
    for k, ids in parts.items():            # direct computation: transformers, same windows
        nll = n = 0
        for a in range(0, len(ids) - 1, 128):
            chunk = ids[a:a + 129]
            logits = reference_logits(ref, chunk[:-1])
            nll += F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
            n += len(chunk) - 1
        assert res["exact_perplexity"][k] == pytest.approx(math.exp(nll / n), rel=1e-4)
    r0, r5 = res["rows"]
    assert r0["ppl_increase"]["all"] == pytest.approx(0, abs=0.02) and r0["agreement"] > 0.9
    assert r5["kept_share"] < r0["kept_share"] and r5["bytes_per_token"] < res["all_bytes_per_token"]
    # the sparse rows' perplexity is the engine's own perplexity with the selector on
    eng.selector.set_sparsity(0.5)
    direct = perplexity(eng, parts["prose"], 128)["perplexity"]
    assert r5["perplexity"]["prose"] == pytest.approx(direct, rel=1e-6)
    eng.close()


def test_interrupted_calibrate_leaves_the_bundle_as_it_was(calibrated, monkeypatch):
    path, _ = calibrated("llama_tied", "lowrank")
    before = store.predictor_path(path, "lowrank").read_bytes()
    listing = sorted(os.listdir(path))

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(store, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        calibrate(path, "lowrank", tokens=TOKENS, seed=1)
    assert store.predictor_path(path, "lowrank").read_bytes() == before
    assert sorted(os.listdir(path)) == listing


def test_bad_predictor_files_are_named(calibrated, tmp_path):
    import shutil
    path, _ = calibrated("llama", "threshold")
    b = tmp_path / "b"
    shutil.copytree(path, b)
    cfg = Bundle(b).config
    with pytest.raises(FlashinferError, match="no lowrank predictor.*calibrate"):
        store.load(b, "lowrank", cfg)
    f = store.predictor_path(b, "threshold")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FlashinferError, match="unreadable predictor.*re-run calibrate"):
        Engine(b, offload="none", selector="predictor")
    tensors, meta = store.load(path, "threshold", cfg)
    store.save(b, "threshold", tensors, {**meta, "format_version": 99})
    with pytest.raises(FlashinferError, match="version 99"):
        store.load(b, "threshold", cfg)
    shutil.rmtree(b)
    with pytest.raises(FlashinferError, match="no calibrated predictor"):
        shutil.copytree(path, b)
        store.predictor_path(b, "threshold").unlink()
        Engine(b, offload="none", selector="predictor")


def test_threshold_predictor_is_counted_in_the_budget(calibrated):
    from flashinfer_local.runtime.budget import minimum_budget
    path, _ = calibrated("llama", "threshold")
    b = Bundle(path)
    gate_rows = b.config.n_layers * b.config.d_ff * b.config.d_model * 2
    budget = minimum_budget(b, 256) + gate_rows // 2
    Engine(path, offload="window", dram_budget=budget, context=256).close()          # fits without it
    with pytest.raises(FlashinferError, match="predictor.*--predictor lowrank"):
        Engine(path, offload="window", dram_budget=budget, context=256, selector="predictor",
               predictor="threshold")


def test_cli_calibrate_inspect_eval_run(tiny_bundle, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from flashinfer_local.cli import main
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle("qwen2"), b)
    r = CliRunner().invoke(main, ["calibrate", str(b), "--tokens", "600", "--predictor", "lowrank",
                                  "--json", str(tmp_path / "cal.json")])
    assert r.exit_code == 0, r.output
    assert "default sparsity" in r.output and json.loads((tmp_path / "cal.json").read_text())["kind"] == "lowrank"
    r = CliRunner().invoke(main, ["inspect", str(b)])
    assert "predictor   lowrank: rank" in r.output
    r = CliRunner().invoke(main, ["eval", str(b), "--tokens", "300", "--gen-tokens", "8", "--sparsity", "0.3",
                                  "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "q.json").read_text())
    assert [row["sparsity"] for row in res["rows"]] == [0.3] and (tmp_path / "q.png").stat().st_size > 0
    r = CliRunner().invoke(main, ["run", str(b), "-p", "def f(x):", "-n", "4", "--selector", "predictor",
                                  "--dram-budget", "1GiB", "--offload", "window", "--stats"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["run", str(b), "-p", "x", "-n", "2", "--selector", "predictor",
                                  "--predictor", "threshold"])
    assert r.exit_code == 1 and "no threshold predictor" in r.output and "calibrate" in r.output
