"""Shared-weight recursive models: one stored layer run at several positions (``layer_map``).

Tiny random recursive checkpoints (``tiny_recursive``) against transformers models of the same
depth with those layers' weights tied, in every offload mode, and against the same weights stored
untied (the bytes a token reads show the reuse)."""
import json

import pytest
import torch

from flashinfer_local.kernels import SMALL_T
from flashinfer_local.runtime.budget import kv_cache_bytes, minimum_budget
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import SamplingParams
from storage.convert import convert
from storage.errors import CheckpointError, FlashinferError
from storage.reader import Bundle
from tiny_models import reference_greedy, reference_logits
from tiny_recursive import ARCHS, LAYER_MAP, make_recursive_checkpoint, reference_model

GREEDY = SamplingParams(temperature=0)
IDS = [5, 17, 42, 7, 99, 3, 150, 8, 21, 64, 11, 2]
CTX = 64


@pytest.fixture(scope="module")
def recursive(tmp_path_factory):
    """Factory: (arch, dtype, tied) -> (checkpoint, bundle), made once per module."""
    made = {}

    def get(arch: str, dtype: str = "f32", tied: bool = True):
        key = arch, tied
        if key not in made:
            made[key] = {"ckpt": make_recursive_checkpoint(tmp_path_factory.mktemp(f"rec_{arch}_{tied}"), arch,
                                                           tied=tied)}
        if dtype not in made[key]:
            out = tmp_path_factory.mktemp(f"rec_{arch}_{tied}_{dtype}") / "b"
            made[key][dtype] = convert(made[key]["ckpt"], out, dtype=dtype, progress=False)
        return made[key]["ckpt"], made[key][dtype]
    return get


def tokens(eng, n=24):
    return [s.token_id for s in eng.generate(IDS, n, GREEDY, stop_at_eos=False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_recursive_models_match_transformers(arch, recursive):
    ckpt, path = recursive(arch)
    cfg = Bundle(path).config
    assert cfg.layer_map == LAYER_MAP and cfg.n_layers == 3 and cfg.depth == len(LAYER_MAP)
    ref = reference_model(ckpt)
    want, got = reference_logits(ref, IDS), Engine(path).logits(IDS)
    assert (want - got).abs().max() < 1e-4 * want.abs().max()
    assert tokens(Engine(path), 32) == reference_greedy(ref, IDS, 32)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_every_offload_mode_follows_the_reference(arch, recursive):
    ckpt, path = recursive(arch)
    ref = reference_model(ckpt)
    want = reference_greedy(ref, IDS, 24)
    scale = reference_logits(ref, IDS).abs().max()
    b = Bundle(path)
    third = (b.config.d_ff // 3) * b.config.n_layers * (b.layout.record_bytes + 24)
    base = minimum_budget(b, CTX)
    for mode, budget in (("window", base), ("window", base + third), ("window", None), ("naive", None)):
        eng = Engine(path, offload=mode, dram_budget=budget, context=CTX)
        assert tokens(eng) == want, (mode, budget)
        assert (eng.logits(IDS) - reference_logits(ref, IDS)).abs().max() < 1e-4 * scale, (mode, budget)


@pytest.mark.parametrize("dtype", ["f16", "int8", "int4"])
def test_quantized_recursive_bundles_run_as_their_untied_twins(dtype, recursive):
    """The same weights stored once or at every position give the same tokens in each mode (an
    int8 bundle's DRAM mode requantizes its down columns, so its tokens may differ from its
    streamed ones on this random model, the same way for both)."""
    _, path = recursive("llama", dtype)
    _, untied = recursive("llama", dtype, tied=False)
    for opts in ({}, {"offload": "window", "context": CTX}, {"offload": "naive", "context": CTX},
                 {"offload": "window", "context": 96, "draft": "self", "draft_tokens": "4"}):
        assert tokens(Engine(path, **opts)) == tokens(Engine(untied, **opts)), opts


def test_kv_is_kept_per_position_and_the_budget_counts_stored_layers(recursive):
    _, path = recursive("gemma3")
    _, untied = recursive("gemma3", tied=False)
    eng, flat = Engine(path), Engine(untied)
    cache = eng.new_cache(40)
    assert len(cache.k) == len(LAYER_MAP) and cache.windows == flat.new_cache(40).windows
    assert cache.nbytes + sum(t.numel() * 4 for t in cache.tables) == kv_cache_bytes(eng.config, 40, 4)
    assert eng.plan.dense_bytes < flat.plan.dense_bytes                    # each stored layer once
    assert eng.plan.ffn_dram_bytes * len(LAYER_MAP) == flat.plan.ffn_dram_bytes * 3
    assert eng.plan.kv_bytes == flat.plan.kv_bytes


def test_a_shared_layer_read_once_serves_every_position(recursive):
    """Window mode reads a stored layer's records once for all the positions that run it; at the
    same budget the recursive model reads fewer bytes per token than its untied twin, with the
    same tokens."""
    _, path = recursive("llama")
    _, untied = recursive("llama", tied=False)
    want = tokens(Engine(path))
    assert tokens(Engine(untied)) == want
    big = Engine(path, offload="window", context=CTX)          # room for every record
    steps = list(big.generate(IDS, 6, GREEDY, stop_at_eos=False))
    b = Bundle(path)
    layer = b.config.d_ff * b.layout.record_bytes
    # the prompt (up to SMALL_T tokens: through the window) reads each stored layer's records once,
    # the decode tokens nothing more
    assert len(IDS) <= SMALL_T and steps[-1].stats.extra["flash_bytes_read"] == 3 * layer
    budget = max(minimum_budget(Bundle(untied), CTX), minimum_budget(b, CTX)) + 3 * layer // 2
    read = {}
    for name, p in (("recursive", path), ("untied", untied)):
        eng = Engine(p, offload="window", dram_budget=budget, context=CTX)
        steps = list(eng.generate(IDS, 16, GREEDY, stop_at_eos=False))
        assert [s.token_id for s in steps] == want[:16], name
        read[name] = steps[-1].stats.extra["flash_bytes_per_token"]
    assert read["recursive"] < 0.7 * read["untied"], read


def test_a_damaged_layer_map_is_refused_by_name(recursive, tmp_path):
    ckpt, _ = recursive("llama")
    for bad, why in (([0, 1, 2], "must list, for each of the 7 layers"), ([0, 1, 3, 1, 3, 1, 3], "never runs stored layer 2"),
                     ("0,1,2", "must list")):
        d = tmp_path / f"c{len(str(bad))}"
        d.mkdir()
        for f in ckpt.iterdir():
            (d / f.name).symlink_to(f)
        (d / "config.json").unlink()
        (d / "config.json").write_text(json.dumps({**json.loads((ckpt / "config.json").read_text()), "layer_map": bad}))
        with pytest.raises(CheckpointError, match=why):
            convert(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_positions_sharing_a_layer_must_agree_on_its_attention(recursive, tmp_path):
    ckpt, _ = recursive("gemma3")
    c = json.loads((ckpt / "config.json").read_text())
    c["layer_types"] = ["sliding_attention"] * len(LAYER_MAP)            # stored layer 2: global at 2, local at 4
    c["layer_types"][2] = "full_attention"
    (tmp_path / "config.json").write_text(json.dumps(c))
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="layers 2 and 4 share stored layer 2"):
        convert(tmp_path, tmp_path / "out", progress=False)


def test_plan_refuses_a_recursive_bundle_and_inspect_shows_the_map(recursive):
    from click.testing import CliRunner

    from flashinfer_local.cli import main
    from flashinfer_local.workflows.plan import make_plan
    _, path = recursive("llama")
    with pytest.raises(FlashinferError, match="recursive model"):
        make_plan(path, 64 << 20)
    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 0 and "7 layer positions run the 3 stored layers 0 1 2 1 2 1 2" in out.output
    assert torch.equal(torch.tensor(Bundle(path).config.stack), torch.tensor(LAYER_MAP))
