"""The `flashinfer-local` command line (click)."""
from .main import main

__all__ = ["main"]
