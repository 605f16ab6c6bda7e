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
