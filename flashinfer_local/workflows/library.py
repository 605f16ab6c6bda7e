"""What the cache holds: the known models' GGUF files and the bundles converted from them (or from
any other checkpoint), with their sizes; removing them by name."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from storage import format as fmt
from storage.errors import FlashinferError

from flashinfer_local.workflows.fetch import MODELS, cache_root, model_path


@dataclass
class Entry:
    name: str            # a known model's name, or a bundle's folder name
    kind: str            # "model" (a fetched GGUF) or "bundle"
    path: Path
    bytes: int
    about: str = ""


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bundles_dir() -> Path:
    return cache_root() / "bundles"


def bundles_of(name: str) -> list[Path]:
    """The cached bundles converted from known model ``name`` (any precision)."""
    stem = MODELS[name]["file"].replace(".gguf", "")
    d = bundles_dir()
    return sorted(p for p in d.glob(f"{stem}-*") if (p / fmt.MANIFEST).exists()) if d.is_dir() else []


def entries() -> list[Entry]:
    """Every known model (fetched or not: bytes 0 when not) and every cached bundle."""
    out = []
    for name, m in MODELS.items():
        p = model_path(name)
        out.append(Entry(name, "model", p, p.stat().st_size if p.exists() else 0, m["about"]))
    d = bundles_dir()
    source = {p: n for n in MODELS for p in bundles_of(n)}          # bundle -> the known model it came from
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if (p / fmt.MANIFEST).exists():
                src = source.get(p)
                out.append(Entry(p.name, "bundle", p, _tree_bytes(p), f"from {src}" if src else ""))
    return out


def find_bundle(name: str) -> Path | None:
    """A cached bundle by its folder name."""
    p = bundles_dir() / name
    return p if name and "/" not in name and (p / fmt.MANIFEST).exists() else None


def remove(name: str, bundles_only: bool = False) -> list[Entry]:
    """Delete known model ``name``'s GGUF and its bundles (``bundles_only``: keep the GGUF), or the
    cached bundle folder ``name`` -> what was removed."""
    if name in MODELS:
        gone = [Entry(p.name, "bundle", p, _tree_bytes(p)) for p in bundles_of(name)]
        gguf = model_path(name)
        if not bundles_only and gguf.exists():
            gone.append(Entry(name, "model", gguf, gguf.stat().st_size))
    elif (p := find_bundle(name)) is not None:
        gone = [Entry(name, "bundle", p, _tree_bytes(p))]
    else:
        raise FlashinferError(f"nothing named {name!r} in the cache: give a known model ({', '.join(MODELS)}) or a "
                              "bundle name from flashinfer-local list")
    for e in gone:
        if e.kind == "bundle":
            shutil.rmtree(e.path)
        else:
            e.path.unlink()
            e.path.with_name(f".{e.path.name}.verified").unlink(missing_ok=True)
    return gone
