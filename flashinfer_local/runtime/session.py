"""A generation session: a KV cache and its position, kept across calls.

``append(tokens)`` runs one forward over T tokens and returns the logits of each; ``rollback(pos)``
forgets everything from ``pos`` on (the keys and values there are overwritten by the next append);
``generate`` samples a continuation, reusing the cache for the part of a new prompt that matches
what the session already holds (a chat's earlier turns are not computed again). Speculative
decoding verifies drafted tokens with ``append`` and rolls back the rejected ones.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from storage.errors import FlashinferError

from flashinfer_local.runtime.rss import PeakRSS
from flashinfer_local.runtime.sampling import GenerationStats, Sample, Sampler, SamplingParams, Step
from flashinfer_local.runtime.speculative import MAX_DRAFT, DraftLength, Proposal, verify
from flashinfer_local.runtime.tokenizer import IncrementalDecoder

FIRST_CAPACITY = 256       # tokens a session's cache starts with when no capacity is given


class StopStrings:
    """Finds the first stop string in generated text, holding back any tail that may start one."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or ()) if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was reached: emit, then end)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        keep = 0          # the longest tail of buf that is a prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        p, self.pending = self.pending, ""
        return p


class TextStream:
    """Generated tokens -> the text to emit: incremental detokenization, then the stop strings."""

    def __init__(self, tokenizer, stops):
        self.detok = IncrementalDecoder(tokenizer) if tokenizer.available else None
        self.stops = StopStrings(stops)

    def add(self, token: int) -> tuple[str, bool]:
        """(text this token completes, whether a stop string was reached)."""
        return self.stops.feed(self.detok.add(token) if self.detok else "")

    def finish(self) -> tuple[str, bool]:
        """Everything still held back (a stop string can still complete in it)."""
        text, hit = self.stops.feed(self.detok.flush() if self.detok else "")
        return (text, True) if hit else (text + self.stops.flush(), False)


class Session:
    """A KV cache and the tokens in it, on one engine. ``capacity`` (tokens) sizes the cache up
    front; without it the cache starts small and doubles as needed, up to the engine's limit."""

    def __init__(self, engine, capacity: int | None = None, forward=None):
        # forward: what runs the model (default engine.forward; the self draft's is restricted)
        self.engine = engine
        self.forward = forward or engine.forward
        self.tokens: list[int] = []          # what the cache holds, in order
        first = capacity if capacity is not None else min(FIRST_CAPACITY, engine.kv_limit)
        self.cache = engine.new_cache(first)
        self.draft = None                    # the engine's speculative draft for this session (made on first use)
        self.reused = 0                      # prompt tokens the last prefill found in the cache

    @property
    def pos(self) -> int:
        return len(self.tokens)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` tokens in all (a clear error past the engine's context)."""
        if n <= self.cache.capacity:
            return
        # doubling, capped at the limit; past it new_cache refuses with the context error
        grown = self.engine.new_cache(max(n, min(2 * self.cache.capacity, self.engine.kv_limit)))
        grown.copy_from(self.cache, self.pos)
        self.cache = grown

    def append(self, tokens, last_only: bool = False) -> torch.Tensor:
        """Run ``tokens`` [T] after what the session holds -> logits [T, vocab] (``last_only``: [1, vocab])."""
        ids = [int(t) for t in tokens]
        if not ids:
            raise FlashinferError("append needs at least one token")
        self.reserve(self.pos + len(ids))
        logits = self.forward(torch.tensor(ids), self.pos, self.cache, last_only)
        self.tokens += ids
        return logits

    def rollback(self, pos: int) -> None:
        """Forget the tokens from position ``pos`` on (all of them where a sliding-window layer's
        ring has overwritten keys the next token would need: more than ``RING_MARGIN`` back, which a
        speculative draft's rollback never is)."""
        if not 0 <= pos <= self.pos:
            raise FlashinferError(f"rollback to {pos}: the session holds {self.pos} tokens")
        if not self.cache.can_rewind(pos, self.pos):
            pos = 0        # a local layer's ring no longer holds the keys before ``pos``: start over
        del self.tokens[pos:]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Make the session hold exactly ``ids``, computing only what differs from what it holds
        -> the logits [vocab] after the last id."""
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        self.rollback(min(common, len(ids) - 1))        # the last id is always run: its logits
        self.reused = self.pos
        return self.append(ids[self.pos:], last_only=True)[-1]

    def generate(self, prompt, max_tokens: int = 128, sampling: SamplingParams | None = None,
                 stop_at_eos: bool = True, stop=(), chat: bool = False, logprobs: bool = False,
                 speculate: bool = True) -> Iterator[Step]:
        """Prefill ``prompt`` (text, chat messages or ids) then sample up to ``max_tokens``; yields
        a :class:`Step` per token. Ends at a stop string (its text is not emitted), at an
        end-of-sequence token, or at ``max_tokens`` (``stats.finish_reason``: stop, eos, length).
        Text still held back when an end-of-sequence token ends it comes in one last step that
        carries that token. ``logprobs``: each step keeps its :class:`Sample` (the distribution
        over the vocabulary, so a caller keeping every step keeps one such tensor per token).
        With a draft (the engine's ``draft`` option) and ``speculate``, tokens come from
        speculative verification (``runtime.speculative``): the same greedy tokens, the same
        sampling distribution."""
        eng = self.engine
        ids = eng.encode_prompt(prompt, chat)
        if not ids:
            raise FlashinferError("the prompt is empty: give some text or token ids",
                                  cli="the prompt is empty: give some text with -p")
        if max_tokens < 0:
            raise FlashinferError(f"max_tokens {max_tokens} must be at least 0")
        self.reserve(len(ids) + max_tokens)                      # refuse before any work
        sampler = Sampler(sampling or SamplingParams())
        eos = eng.tokenizer.eos_token_ids if stop_at_eos else frozenset()
        text_out = TextStream(eng.tokenizer, stop)
        st = GenerationStats(prompt_tokens=len(ids))
        if speculate and self.draft is None:
            self.draft = eng.new_draft()
        draft = self.draft if speculate else None
        st.draft = draft.name if draft is not None else None
        with PeakRSS() as peak, torch.inference_mode():
            t0 = time.perf_counter()
            logits = self.prefill(ids)
            if draft is not None:
                draft.prepare(ids)
            st.prefill_s = time.perf_counter() - t0
            st.cached_tokens = self.reused
            after_prefill, memory = eng.counters(), eng.memory_facts()    # the arrays are fixed

            def step(tok, text, sample):
                peak.sample()
                st.peak_rss_bytes = peak.peak
                st.extra = {**memory, "kv_cache_bytes": self.cache.nbytes,
                            **eng.io_stats(after_prefill, eng.counters(), st.decode_tokens)}
                return Step(tok, text, st, st.finish_reason, sample if logprobs else None)

            tokens = (self._speculative(logits, sampler, max_tokens, st, draft) if draft is not None
                      else self._plain(logits, sampler, max_tokens, st))
            for n, sample in enumerate(tokens):
                tok = sample.token
                if tok in eos:
                    rest, hit = text_out.finish()
                    st.finish_reason = "stop" if hit else "eos"
                    if rest:
                        yield step(tok, rest, sample)
                    return
                st.token_ids.append(tok)
                st.generated_tokens = len(st.token_ids)
                text, hit = text_out.add(tok)
                if not hit and n == max_tokens - 1:                       # the last token: flush
                    tail, hit = text_out.finish()
                    text += tail
                    st.finish_reason = "length"
                if hit:
                    st.finish_reason = "stop"
                yield step(tok, text, sample)
                if hit or n == max_tokens - 1:
                    return
        if st.finish_reason is None:
            st.finish_reason = "length"                                 # max_tokens == 0

    def _plain(self, logits: torch.Tensor, sampler: Sampler, max_tokens: int, st: GenerationStats) -> Iterator:
        """One forward per token: sample, then run the sampled token."""
        tok = None
        for n in range(max_tokens):
            if n:
                t = time.perf_counter()
                logits = self.append([tok], last_only=True)[-1]
                st.decode_s += time.perf_counter() - t
                st.decode_steps += 1
                st.decode_tokens += 1
            sample = sampler(logits)
            tok = sample.token
            yield sample

    def _speculative(self, logits: torch.Tensor, sampler: Sampler, max_tokens: int, st: GenerationStats,
                     draft) -> Iterator:
        """Draft k tokens after the pending one, verify pending + drafts in one forward, keep the
        accepted ones and the target's next token (which becomes pending: sampled, not yet run)."""
        if max_tokens < 1:
            return
        pending = sampler(logits)
        yield pending
        n, length = 1, DraftLength(self.engine.options.draft_tokens)
        while n < max_tokens:
            t0 = time.perf_counter()
            k = max(0, min(length.k, MAX_DRAFT, max_tokens - n - 1))
            prop = draft.propose(self.tokens + [pending.token], k, sampler) if k else Proposal([])
            t1 = time.perf_counter()
            base = self.pos
            out = self.append([pending.token] + prop.tokens)                 # [k + 1, vocab]
            kept, nxt = verify(out, prop, sampler)
            self.rollback(base + 1 + kept)
            now = time.perf_counter()
            st.draft_s += t1 - t0
            st.decode_s += now - t0
            st.decode_steps += 1
            st.drafted_tokens += len(prop.tokens)
            st.accepted_tokens += kept
            st.decode_tokens += kept + 1
            length.update(len(prop.tokens), kept, t1 - t0, now - t1)
            for i in range(kept):
                yield Sample(prop.tokens[i], out[i], sampler)
            pending = nxt
            yield pending
            n += kept + 1
