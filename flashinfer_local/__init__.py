"""flashinfer-local: run language models larger than DRAM from a neuron-bundled store on the SSD.

Python API::

    import flashinfer_local as fl
    eng = fl.load("bundle_dir")                     # or an HF folder / GGUF file, or None (default)
    for step in eng.generate("Once upon a time", max_tokens=32,
                             sampling=fl.SamplingParams(temperature=0)):
        print(step.text, end="", flush=True)
    print(step.stats.to_dict())
"""
from storage import __version__
from storage.convert import convert
from storage.errors import FlashinferError

from flashinfer_local.workflows.calibrate import calibrate
from flashinfer_local.runtime.engine import Engine
from flashinfer_local.runtime.sampling import GenerationStats, SamplingParams, Step


def load(model=None, dtype: str = "f16", threads: int | None = None) -> Engine:
    """Open MODEL (bundle, HF folder, GGUF file, or None for the default model) as an Engine."""
    from flashinfer_local.workflows.resolve import resolve_model
    return Engine(resolve_model(None if model is None else str(model), dtype=dtype, progress=False),
                  threads=threads)


__all__ = ["Engine", "GenerationStats", "SamplingParams", "Step", "FlashinferError", "calibrate", "convert",
           "load", "__version__"]
