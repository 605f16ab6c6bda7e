"""Sampling and the generation loop (a generator of tokens with live stats)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from storage.errors import FlashinferError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7     # 0: greedy
    top_p: float = 0.95
    top_k: int = 40              # 0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise FlashinferError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise FlashinferError(f"--top-p {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise FlashinferError(f"--top-k {self.top_k} must be >= 0 (0 turns it off)")


class Sampler:
    """Built once per generation; ``__call__`` maps logits [vocab] to a token id."""

    def __init__(self, p: SamplingParams):
        self.p = p
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.p
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1:
            sp, si = torch.sort(probs, descending=True)
            drop = sp.cumsum(-1) - sp > p.top_p       # keep the smallest set reaching top_p
            sp[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=self.gen))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0        # time of all decode steps (forwards after the prefill)
    decode_steps: int = 0
    peak_rss_bytes: int = 0
    token_ids: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # engine facts: memory by owner, I/O, cache, timings

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_steps": self.decode_steps,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "peak_rss_bytes": self.peak_rss_bytes, "token_ids": list(self.token_ids), **self.extra}


@dataclass
class Step:
    token_id: int
    text: str                  # new text this token completes (may be "" mid-character)
    stats: GenerationStats


def decode_loop(forward, new_cache, ids: list[int], max_tokens: int, sampler: Sampler,
                eos: frozenset[int], detok=None, on_token=None):
    """Prefill ``ids`` then sample up to ``max_tokens``; yields a :class:`Step` per token.

    forward(tokens LongTensor[T], pos, cache) -> logits [1, vocab]; new_cache(capacity) -> cache.
    """
    if not ids:
        raise FlashinferError("the prompt is empty: give some text with -p")
    st = GenerationStats(prompt_tokens=len(ids))
    cache = new_cache(len(ids) + max_tokens)
    t0 = time.perf_counter()
    logits = forward(torch.tensor(ids), 0, cache)[-1]
    st.prefill_s = time.perf_counter() - t0
    pos, emitted, out = len(ids), "", []
    for n in range(max_tokens):
        if n:
            t = time.perf_counter()
            logits = forward(torch.tensor([tok]), pos, cache)[-1]
            pos += 1
            st.decode_s += time.perf_counter() - t
            st.decode_steps += 1
        tok = sampler(logits)
        if tok in eos:
            break
        out.append(tok)
        st.token_ids = out
        st.generated_tokens = len(out)
        text = ""
        if detok is not None:
            full = detok(out)
            if not full.endswith("\ufffd"):          # hold back half a multi-byte character
                text, emitted = full[len(emitted):], full
        if on_token:
            on_token()
        yield Step(tok, text, st)
