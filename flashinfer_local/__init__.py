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

The names below load on first use (PEP 562), so that importing the package, and so starting the
command line, costs nothing until torch is needed (and Ctrl-C during start-up is one line).
"""
from importlib import import_module

from storage import __version__
from storage.errors import FlashinferError

_LAZY = {
    "Engine": "flashinfer_local.runtime.engine", "EngineOptions": "flashinfer_local.runtime.options",
    "GenerationStats": "flashinfer_local.runtime.sampling", "SamplingParams": "flashinfer_local.runtime.sampling",
    "Step": "flashinfer_local.runtime.sampling", "Session": "flashinfer_local.runtime.session",
    "calibrate": "flashinfer_local.workflows.calibrate", "convert": "storage.convert",
    "Conversation": "flashinfer_local.workflows.conversation", "make_plan": "flashinfer_local.workflows.plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashinfer_local' has no attribute {name!r}")


def load(model=None, dtype: str = "f16", options=None, **overrides):
    """Open MODEL (bundle, HF folder, GGUF file, a known model's name, or None for the default
    model) as an Engine; ``options``/``overrides``: any :class:`EngineOptions` field
    (``dram_budget``, ``offload``, ...)."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.workflows.resolve import resolve_model
    return Engine(resolve_model(None if model is None else str(model), dtype=dtype, progress=False),
                  options, **overrides)


__all__ = ["Engine", "EngineOptions", "GenerationStats", "SamplingParams", "Session", "Step", "FlashinferError",
           "Conversation", "calibrate", "convert", "load", "make_plan", "__version__"]
