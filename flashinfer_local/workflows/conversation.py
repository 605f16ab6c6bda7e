"""A multi-turn conversation on one engine: the messages, a system message, and the session whose
KV cache holds them, so each turn prefills only its own tokens.

``reply`` streams an answer. A turn that would overrun the context is refused with a
:class:`ContextFull` naming what is needed; ``drop_oldest`` then removes the oldest exchange (the
next turn re-prefills from where the kept messages begin to differ). An answer stopped early
(``stop()`` returning True, e.g. after Ctrl-C) keeps what it had generated.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from storage.errors import FlashinferError

from flashinfer_local.runtime.sampling import GenerationStats, SamplingParams, Step


class ContextFull(FlashinferError):
    def __init__(self, tokens: int, answer: int, context: int, can_drop: bool):
        self.tokens, self.answer, self.context, self.can_drop = tokens, answer, context, can_drop
        super().__init__(f"the conversation is {tokens} tokens; with room for a {answer}-token answer it "
                         f"exceeds the context of {context} tokens"
                         + ("" if can_drop else "; shorten the message or raise --context"))


class Conversation:
    def __init__(self, engine, system: str | None = None, max_tokens: int = 512,
                 sampling: SamplingParams | None = None):
        self.engine = engine
        self.system = system
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingParams()
        self.turns: list[dict] = []                 # user and assistant messages, in order
        self.session = engine.session()
        self.context = engine.kv_limit
        self.last: GenerationStats | None = None    # the last answer's stats

    def messages(self, user: str | None = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.turns + ([{"role": "user", "content": user}] if user is not None else [])

    @property
    def tokens(self) -> int:
        """Tokens the cache holds."""
        return self.session.pos

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns = []
        self.session.rollback(0)

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def drop_oldest(self) -> bool:
        """Forget the oldest exchange (a user message and its answer); False when none is left."""
        if not self.turns:
            return False
        del self.turns[:2 if len(self.turns) > 1 else 1]
        return True

    def plan(self, user: str) -> tuple[list[int], int]:
        """(the prompt's ids, the answer's token limit) for the next turn, or ContextFull."""
        ids = self.engine.encode_prompt(self.messages(user))
        room = self.context - len(ids)
        if room < min(self.max_tokens, 16) or (room < self.max_tokens and self.turns):
            raise ContextFull(len(ids), self.max_tokens, self.context, bool(self.turns))
        return ids, min(self.max_tokens, room)

    def reply(self, user: str, stop: Callable[[], bool] = lambda: False) -> Iterator[Step]:
        """Stream the answer to ``user``; the exchange joins the history when it ends (stopped early
        or not). Raises ContextFull before any work when it does not fit."""
        ids, limit = self.plan(user)
        text = []
        try:
            for step in self.session.generate(ids, max_tokens=limit, sampling=self.sampling):
                text.append(step.text)
                self.last = step.stats
                yield step
                if stop():
                    break
        finally:
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(text)}]
