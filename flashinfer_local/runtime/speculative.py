"""Speculative decoding: a draft proposes k tokens, the target verifies them in one forward of
k + 1 tokens (in streaming modes each layer reads the union of the neurons those tokens need
once), and the session keeps the accepted prefix plus one token of the target's own.

Lossless: every token the target emits is drawn from the target's distribution at that position.
Greedy: a drafted token is kept when it is the target's argmax, so the text is the non-speculative
greedy text (``kernels.SMALL_T``: a forward of up to 16 tokens computes each exactly as a
one-token forward does). Sampling: standard speculative rejection sampling (Leviathan et al.;
Chen et al.): keep drafted token d with probability min(1, p(d) / q(d)), else draw from the
normalized max(p - q, 0); after k kept tokens, draw from the target's next distribution.

``DraftLength`` chooses k (fixed, or ``auto`` from the measured acceptance and costs).

Drafts: ``lookup`` (continue an n-gram of the context found earlier in it: no model, no memory),
``self`` (the target restricted to the FFN neurons its window already holds: no SSD reads, its own
KV cache), or a model sharing the target's tokenizer, all in DRAM (``Engine`` opens it inside the
target's budget).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from storage.errors import FlashinferError

from flashinfer_local.kernels import SMALL_T
from flashinfer_local.runtime.sampling import Sample, Sampler

MAX_DRAFT = SMALL_T - 1     # drafted tokens per verification: k + 1 <= SMALL_T
AUTO_START, AUTO_MAX = 4, 12
LOOKUP_NGRAM = 3            # longest n-gram prompt lookup matches (then shorter ones)


@dataclass
class Proposal:
    tokens: list[int]
    probs: list[torch.Tensor] | None = None   # the draft's distributions q_i [vocab]; None: deterministic


class DraftLength:
    """How many tokens to draft: a fixed k, or ``auto``: k grows by 2 after a fully accepted draft
    (up to AUTO_MAX) and shrinks by 1 after a rejection (acceptance comes in runs: stretches of
    code both models complete alike, then a divergence), and drafting stops (k = 0, plain steps)
    while the measured tokens per second of speculative steps are below those of plain steps (low
    acceptance, or a verification costing nearly k + 1 forwards, as all in DRAM on few cores),
    with a probe every PROBE_EVERY plain steps to notice when it starts paying. The first decode
    step is a plain one, to measure it."""

    DECAY = 0.7           # weight of the past in the running averages
    PROBE_EVERY = 8

    def __init__(self, k: int | str):
        self.auto = k == "auto"
        self.k = 0 if self.auto else int(k)
        self.grow = AUTO_START        # the length k takes while drafting pays
        self.spec_rate = self.plain_rate = None    # tokens per second of either kind of step
        self.spec_steps = self.idle = 0            # speculative steps so far; plain ones since the last

    def _avg(self, old, new):
        return new if old is None else self.DECAY * old + (1 - self.DECAY) * new

    def update(self, drafted: int, accepted: int, draft_s: float = 0.0, verify_s: float = 0.0) -> None:
        if not self.auto:
            return
        seconds = max(draft_s + verify_s, 1e-9)
        if drafted == 0:
            self.plain_rate = self._avg(self.plain_rate, 1 / seconds)
            self.idle += 1
        else:
            self.spec_rate = self._avg(self.spec_rate, (accepted + 1) / seconds)
            self.spec_steps += 1
            self.idle = 0
            self.grow = min(self.grow + 2, AUTO_MAX) if accepted == drafted else max(1, self.grow - 1)
        self.k = self._choose()

    def _choose(self) -> int:
        if self.plain_rate is None:
            return 0
        losing = self.spec_steps >= 2 and self.spec_rate < self.plain_rate
        return 0 if losing and self.idle < self.PROBE_EVERY else self.grow


class LookupDraft:
    """Prompt lookup: find the longest n-gram (n = LOOKUP_NGRAM..1) ending the context that also
    occurs earlier in it, most recent occurrence first, and propose what followed it there."""
    name = "lookup"

    def prepare(self, ids: list[int]) -> None:
        pass

    def propose(self, ctx: list[int], k: int, sampler: Sampler) -> Proposal:
        a = np.asarray(ctx, np.int64)
        L = len(a)
        for n in range(min(LOOKUP_NGRAM, L - 1), 0, -1):
            tail = a[L - n:]
            starts = np.flatnonzero(a[:L - n] == tail[0])            # candidate starts before the tail
            for s in starts[::-1]:
                if s + n < L and np.array_equal(a[s:s + n], tail):
                    cont = a[s + n:s + n + k]
                    if len(cont):
                        return Proposal([int(t) for t in cont])
        return Proposal([])

    def close(self) -> None:
        pass


class SessionDraft:
    """A draft that runs a model in its own session (KV cache): the target restricted to its
    resident neurons (``self``), or a smaller model with the same tokenizer."""

    def __init__(self, name: str, session):
        self.name, self.session = name, session

    def prepare(self, ids: list[int]) -> None:
        """Run the prompt through the draft (with the target's prefill, not in decode time)."""
        try:
            self.session.reserve(len(ids))
            self.session.prefill(ids)
        except FlashinferError:                 # past the draft's own context: it will not draft
            pass

    def propose(self, ctx: list[int], k: int, sampler: Sampler) -> Proposal:
        s = self.session
        try:
            s.reserve(len(ctx) + k)
        except FlashinferError:                 # past the draft's own context: stop drafting
            return Proposal([])
        logits = s.prefill(ctx)
        tokens, probs = [], []
        greedy = sampler.p.temperature == 0
        for i in range(k):
            smp = sampler(logits)
            tokens.append(smp.token)
            if not greedy:
                probs.append(smp.probs)
            if i + 1 < k:
                logits = s.append([smp.token], last_only=True)[-1]
        return Proposal(tokens, None if greedy else probs)

    def close(self) -> None:
        pass


def verify(logits: torch.Tensor, prop: Proposal, sampler: Sampler) -> tuple[int, Sample]:
    """The target's logits [k + 1, vocab] after the pending token and each drafted token ->
    (how many drafted tokens are kept, the target's next token after them)."""
    k = len(prop.tokens)
    if sampler.p.temperature == 0:
        target = torch.argmax(logits, dim=-1).tolist()
        a = 0
        while a < k and target[a] == prop.tokens[a]:
            a += 1
        return a, Sample(target[a], logits[a], sampler)
    for i, d in enumerate(prop.tokens):
        p = sampler.distribution(logits[i])
        q = prop.probs[i] if prop.probs is not None else None
        qd = 1.0 if q is None else float(q[d])
        u = float(torch.rand((), generator=sampler.gen))
        if qd > 0 and u < min(1.0, float(p[d]) / qd):
            continue
        if q is None:                            # a deterministic draft: q is all on d
            residual = p.clone()
            residual[d] = 0
        else:
            residual = (p - q).clamp_(min=0)
        total = float(residual.sum())
        residual = residual / total if total > 0 else p
        tok = int(torch.multinomial(residual, 1, generator=sampler.gen))
        return i, Sample(tok, logits[i], sampler, residual)
    p = sampler.distribution(logits[k])
    return k, Sample(int(torch.multinomial(p, 1, generator=sampler.gen)), logits[k], sampler, p)


def check_same_tokenizer(config, tokenizer, draft_config, draft_tokenizer, draft_path) -> None:
    """Refuse a draft whose vocabulary or special tokens differ from the target's."""
    tt, dt = tokenizer, draft_tokenizer
    why = None
    if config.vocab_size != draft_config.vocab_size:
        why = f"vocabulary sizes differ ({draft_config.vocab_size} vs the target's {config.vocab_size})"
    elif tt.available != dt.available:
        why = "only one of them has a tokenizer"
    elif tt.available and tt.vocabulary() != dt.vocabulary():
        why = "their vocabularies differ"
    elif tt.eos_token_ids != dt.eos_token_ids or tt.bos_token_id != dt.bos_token_id:
        why = "their special tokens differ"
    if why:
        raise FlashinferError(f"draft model {draft_path} does not share the target's tokenizer: {why}; "
                              "use a model of the same family (e.g. Qwen2.5-Coder-0.5B for Qwen2.5-Coder-1.5B), "
                              "or --draft lookup")
