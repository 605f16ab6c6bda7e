"""Developer tools that write bundles work on small inputs."""
import importlib.util
from pathlib import Path

from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import SamplingParams
from storage.reader import Bundle

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_synthetic_recursive_model_runs_as_its_untied_copy(tmp_path):
    tool = load_tool("make_synthetic_model")
    from dataclasses import replace

    from storage.config import ModelConfig
    from storage.convert import convert
    cfg = replace(ModelConfig(**tool.SHAPES["tiny"]), n_kv_heads=(2, 2), layer_map=(0, 1, 1, 0))
    flat, alias = tool.untied(cfg)
    assert flat.n_layers == 4 and alias == (0, 1, 1, 0) and not flat.layer_map
    rec = convert(tool.RandomSource(cfg, seed=1), tmp_path / "rec", dtype="f32", progress=False)
    untied = convert(tool.RandomSource(flat, 1, alias), tmp_path / "flat", dtype="f32", progress=False)
    greedy = SamplingParams(temperature=0)
    a, b = (Engine(p, offload="window", context=32).generate([1, 2, 3], 8, greedy, stop_at_eos=False)
            for p in (rec, untied))
    assert [s.token_id for s in a] == [s.token_id for s in b]


def test_synthetic_model_runs_in_every_mode(tmp_path):
    tool = load_tool("make_synthetic_model")
    from storage.config import ModelConfig
    from storage.convert import convert
    cfg = ModelConfig(**tool.SHAPES["tiny"])
    path = convert(tool.RandomSource(cfg, seed=1), tmp_path / "syn", dtype="f32", progress=False)
    assert Bundle(path).manifest["source"]["kind"] == "synthetic"
    greedy = SamplingParams(temperature=0)
    want = [s.token_id for s in Engine(path).generate([1, 2, 3], 8, greedy, stop_at_eos=False)]
    for mode in ("window", "naive"):
        eng = Engine(path, offload=mode, context=32)
        assert [s.token_id for s in eng.generate([1, 2, 3], 8, greedy, stop_at_eos=False)] == want
