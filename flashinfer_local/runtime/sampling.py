"""Sampling (a token and the distribution it came from) and what a generation reports."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from storage.errors import OptionError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7     # 0: greedy
    top_p: float = 0.95
    top_k: int = 40              # 0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise OptionError("temperature", f"{self.temperature} must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"{self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise OptionError("top_k", f"{self.top_k} must be >= 0 (0 turns it off)")


class Sampler:
    """Built once per generation; ``__call__`` maps logits [vocab] to a :class:`Sample`."""

    def __init__(self, p: SamplingParams):
        self.p = p
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed is not None else torch.seed())

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities [vocab] a token is drawn from: temperature, then top-k, then top-p
        (greedy: all mass on the argmax)."""
        p = self.p
        if p.temperature == 0:
            return torch.zeros_like(logits, dtype=torch.float32).index_fill_(0, torch.argmax(logits), 1.0)
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
        return probs

    def __call__(self, logits: torch.Tensor) -> Sample:
        if self.p.temperature == 0:
            return Sample(int(torch.argmax(logits)), logits, self)
        probs = self.distribution(logits)
        return Sample(int(torch.multinomial(probs, 1, generator=self.gen)), logits, self, probs)


class Sample:
    """A sampled token with what it was drawn from (computed on first use: greedy decoding pays nothing)."""
    __slots__ = ("token", "logits", "_sampler", "_probs")

    def __init__(self, token: int, logits: torch.Tensor, sampler: Sampler, probs: torch.Tensor | None = None):
        self.token, self.logits, self._sampler, self._probs = token, logits, sampler, probs

    @property
    def probs(self) -> torch.Tensor:
        """[vocab] the distribution the token was drawn from (after temperature, top-k, top-p)."""
        if self._probs is None:
            self._probs = self._sampler.distribution(self.logits)
        return self._probs

    @property
    def logprob(self) -> float:
        """log p(token) under the model's own distribution (softmax of the raw logits)."""
        return float(torch.log_softmax(self.logits.float(), -1)[self.token])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0       # prompt tokens the session's cache already held (not computed again)
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0        # time of all decode steps (forwards after the prefill, drafting included)
    decode_steps: int = 0        # target forwards after the prefill
    decode_tokens: int = 0       # tokens those forwards produced (more than one each when speculating)
    draft: str | None = None     # the speculative draft (None: none)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    draft_s: float = 0.0         # time spent drafting (inside decode_s)
    peak_rss_bytes: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # stop (a stop string), length (max_tokens), eos; None while running
    extra: dict = field(default_factory=dict)   # engine facts: memory by owner, I/O, cache, timings

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens computed (not those found in the cache) per second of prefill."""
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (not forwards: a verification yields several)."""
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    def speculation(self) -> dict:
        """Drafted and accepted tokens, acceptance, tokens per target forward, draft and verify time
        per generated token (ms)."""
        n = max(self.decode_tokens, 1)
        return {"draft": self.draft, "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "tokens_per_forward": self.tokens_per_forward,
                "draft_ms_per_token": 1000 * self.draft_s / n,
                "verify_ms_per_token": 1000 * (self.decode_s - self.draft_s) / n}

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "generated_tokens": self.generated_tokens,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_steps": self.decode_steps,
                "decode_tokens": self.decode_tokens, "speculation": self.speculation(),
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "peak_rss_bytes": self.peak_rss_bytes, "token_ids": list(self.token_ids),
                "finish_reason": self.finish_reason, **self.extra}


@dataclass
class Step:
    token_id: int
    text: str                  # new text this token completes (may be "" mid-character or while a
                               # stop string may be starting)
    stats: GenerationStats
    finish_reason: str | None = None   # set on the last step: stop, length or eos
    sample: Sample | None = None       # with logprobs=True: ``sample.probs``, ``sample.logprob``
