"""Turn the MODEL argument of `run` into a bundle path, converting into a cache on first use."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from storage import format as fmt
from storage.convert import convert
from storage.errors import FlashinferError

from flashinfer_local.workflows.fetch import DEFAULT_MODEL, MODELS, cache_root, fetch

log = logging.getLogger(__name__)


def bundle_cache_dir(src: Path, dtype: str) -> Path:
    """Cache folder for a checkpoint's bundle: keyed by its path, size and mtime (a changed source
    converts again)."""
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "bundles" / f"{src.name.replace('.gguf', '')}-{dtype}-{key}"


DRAFT_DTYPE = "int4"      # a draft checkpoint converts to the smallest bundle: it runs in DRAM beside its target


def resolve_model(model: str | None, dtype: str = "f16", progress: bool = True, what: str = "MODEL") -> Path:
    """MODEL -> bundle directory: a path (bundle, HF folder, GGUF file), a known model's name
    (fetched and converted on first use), a cached bundle's name, or None for the default model."""
    from flashinfer_local.workflows.library import find_bundle
    name, _, tag = (model or "").partition(":")          # ollama-style NAME:DTYPE, e.g. qwen2.5-coder-1.5b:int4
    if name in MODELS and tag in fmt.CONVERT_DTYPES and not Path(model).exists():
        model, dtype = name, tag
    if model is None or (model in MODELS and not Path(model).exists()):
        src = fetch(model or DEFAULT_MODEL)
    else:
        src = Path(model)
        if not src.exists():
            if (cached := find_bundle(model)) is not None:
                return cached
            raise FlashinferError(f"{what} '{model}' not found: give a bundle directory, an HF checkpoint folder, "
                                  f"a GGUF file or a known model ({', '.join(MODELS)})"
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


def resolve_run(model: str | None, dtype: str, opts, progress: bool = True):
    """MODEL and the engine options' --draft -> (the bundle path, the options with the draft
    resolved): what every command that opens an engine does first."""
    from dataclasses import replace
    path = resolve_model(model, dtype=dtype, progress=progress)
    return path, replace(opts, draft=resolve_draft(opts.draft, progress=progress))
