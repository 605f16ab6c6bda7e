"""Turn the MODEL argument of `run` into a bundle path, converting into a cache on first use."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from storage import format as fmt
from storage.convert import convert
from storage.errors import FlashinferError

from flashinfer_local.workflows.fetch import DEFAULT_MODEL, cache_root, fetch

log = logging.getLogger(__name__)


def bundle_cache_dir(src: Path, dtype: str) -> Path:
    """Cache folder for a checkpoint's bundle: keyed by its path, size and mtime (a changed source
    converts again)."""
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "bundles" / f"{src.name.replace('.gguf', '')}-{dtype}-{key}"


DRAFT_DTYPE = "int4"      # a draft checkpoint converts to the smallest bundle: it runs in DRAM beside its target


def resolve_model(model: str | None, dtype: str = "f16", progress: bool = True, what: str = "MODEL") -> Path:
    """MODEL -> bundle directory. None is the default model, fetched and converted on first use."""
    if model is None:
        src = fetch(DEFAULT_MODEL)
    else:
        src = Path(model)
        if not src.exists():
            raise FlashinferError(f"{what} '{model}' not found: give a bundle directory, an HF "
                                  "checkpoint folder or a GGUF file"
                                  + (" (or omit it for the default model)" if what == "MODEL" else ""))
        if src.is_dir() and (src / fmt.MANIFEST).exists():
            return src
    out = bundle_cache_dir(src, dtype)
    if (out / fmt.MANIFEST).exists():
        return out
    log.info("converting %s into %s (first use)", src, out)
    return convert(src, out, dtype=dtype, progress=progress)


def resolve_draft(draft: str | None, progress: bool = True) -> str | None:
    """--draft: lookup and self as they are; a draft model -> its bundle (a checkpoint converted to
    DRAFT_DTYPE on first use)."""
    if draft in (None, "lookup", "self"):
        return draft
    return str(resolve_model(draft, dtype=DRAFT_DTYPE, progress=progress, what="--draft"))
