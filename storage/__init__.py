"""Storage layer: checkpoint sources, the bundle format, the converter and the bundle reader.

Imports nothing from ``predictors`` or ``flashinfer_local`` (data flows one way).
"""
__version__ = "0.1.0"

from .config import ModelConfig
from .errors import BundleError, CheckpointError, FlashinferError, UnsupportedModelError

__all__ = ["ModelConfig", "BundleError", "CheckpointError", "FlashinferError", "UnsupportedModelError"]
