"""flashinfer-local: run language models larger than DRAM from a neuron-bundled store on the SSD.

Python API::

    import flashinfer_local as fl
    eng = fl.load("bundle_dir", dram_budget=2 << 30)   # or an HF folder / GGUF file, or None (default)
    for step in eng.generate("Once upon a time", max_tokens=32,
                             sampling=fl.SamplingParams(temperature=0), stop=["\\n\\n"]):
        print(step.text, end="", flush=True)
    print(step.stats.to_dict())

    chat = eng.session()                               # a KV cache kept across calls
    messages = [{"role": "user", "content": "Write a haiku about SSDs."}]
    reply = "".join(s.text for s in chat.generate(messages, max_tokens=64))
"""
from storage import __version__
from storage.convert import convert
from storage.errors import FlashinferError

from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.options import EngineOptions
from flashinfer_local.runtime.sampling import GenerationStats, SamplingParams, Step
from flashinfer_local.runtime.session import Session
from flashinfer_local.workflows.calibrate import calibrate


def load(model=None, dtype: str = "f16", options: EngineOptions | dict | None = None, **overrides) -> Engine:
    """Open MODEL (bundle, HF folder, GGUF file, or None for the default model) as an Engine;
    ``options``/``overrides``: any :class:`EngineOptions` field (``dram_budget``, ``offload``, ...)."""
    from flashinfer_local.workflows.resolve import resolve_model
    return Engine(resolve_model(None if model is None else str(model), dtype=dtype, progress=False),
                  options, **overrides)


__all__ = ["Engine", "EngineOptions", "GenerationStats", "SamplingParams", "Session", "Step", "FlashinferError",
           "calibrate", "convert", "load", "__version__"]
