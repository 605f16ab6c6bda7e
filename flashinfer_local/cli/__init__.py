"""The `flashinfer-local` command line (click): ``app`` holds the group and the commands a user
runs a model with; ``analysis`` adds the ones that measure, plan and tune; ``interactive`` adds
chat and serve, ``models`` pull, list and rm; ``options`` derives the engine's options from ``runtime.options.EngineOptions``."""
from flashinfer_local.cli import analysis, interactive, models  # noqa: F401  (register their commands)
from flashinfer_local.cli.app import main

__all__ = ["main"]
