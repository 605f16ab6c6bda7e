"""Checkpoint sources: a uniform, lazy view of an HF folder or a GGUF file.

A source knows the model's :class:`ModelConfig`, its tokenizer, and can load any canonical tensor
(names in :mod:`storage.format`) as float32 in the HF orientation, one tensor at a time, so the
converter never holds more than one layer in memory.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError


@dataclass
class TokenizerInfo:
    tokenizer_json: str | None = None   # text of an HF `tokenizers` tokenizer.json
    chat_template: str | None = None    # jinja2 template, as in tokenizer_config.json / GGUF
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False               # prepend BOS when encoding a prompt


class Source(ABC):
    config: ModelConfig
    tokenizer: TokenizerInfo
    identity: dict        # {"kind", "name", "path", "bytes", "mtime"}

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def load(self, name: str) -> np.ndarray:
        """The canonical tensor ``name`` as float32, HF orientation. Raises CheckpointError if absent."""

    def low_codes(self, name: str) -> str | None:
        """The codes of a bundle's ``auto`` matrices that hold what the checkpoint stores in tensor
        ``name`` (``storage.format.dense_matrix_dtypes``): "q4" for 16 levels per group of 32 (a
        GGUF's Q4_0, Q4_1, Q4_K), carried over instead of rounded a second time; "q5" for 5 or 6
        bits (Q5_0 and Q5_1 carried over, Q5_K and Q6_K re-rounded); None for 8 bits and floats."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(path: str | Path) -> Source:
    """Open an HF checkpoint folder or a GGUF file as a Source."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{p}: not a GGUF file (magic {magic!r}); give a GGUF file or an HF folder")
        from .gguf_source import GGUFSource
        return GGUFSource(p)
    if (p / "config.json").exists():
        from .hf_source import HFSource
        return HFSource(p)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        from .gguf_source import GGUFSource
        return GGUFSource(ggufs[0])
    raise CheckpointError(f"{p}: neither an HF checkpoint folder (no config.json) nor a GGUF file")
