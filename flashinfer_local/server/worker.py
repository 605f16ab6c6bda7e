"""One engine, one generation at a time: a loop that takes jobs from a bounded queue.

``run`` is meant for the main thread (the HTTP server runs its event loop in another): the numba
kernels' parallel regions run about 2x slower when launched from a second thread (measured on
SmolLM2-135M int8: 134 tok/s from the main thread, 52 from another; the small q8 matrix product
12 us -> 52 us per call), so the generation stays where they are fast.

The worker keeps one :class:`~flashinfer_local.runtime.session.Session` for every request, so a
request that extends the previous one (a chat's next turn: the same messages and one more) finds
its prefix in the KV cache and computes only the new tokens. A job's text goes back to the event
loop that submitted it through an asyncio queue; cancelling a job (its client went away) stops its
generation at the next token, and the next job starts at once.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from storage.errors import FlashinferError

from flashinfer_local.runtime.sampling import SamplingParams
from flashinfer_local.server.protocol import APIError, Request, finish, usage

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How a job ended: its OpenAI finish reason (None: it was cancelled), usage, and the engine's
    own timings (as llama.cpp's server reports them: prompt and generation, measured in the engine)."""
    reason: str | None
    usage: dict
    timings: dict | None = None


FLUSH_S = 0.02     # text is handed to the event loop at most this often (each hand-off wakes it)


class Job:
    def __init__(self, req: Request, ids: list[int], max_tokens: int, loop: asyncio.AbstractEventLoop):
        self.req, self.ids, self.max_tokens = req, ids, max_tokens
        self.loop = loop
        # ("text", [pieces, one per token]) ... then ("done", Outcome) or ("error", APIError)
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._pending: list[str] = []
        self._sent = 0.0

    def text(self, piece: str) -> None:
        """From the worker thread: one token's text, handed over with those before it once FLUSH_S
        has passed since the last hand-off (on a machine whose cores the engine fills, every wake-up
        of the event loop preempts a compute thread: measured 2-10% of SmolLM2's decode speed)."""
        self._pending.append(piece)
        now = time.perf_counter()
        if now - self._sent >= FLUSH_S:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            self.emit("text", self._pending)
            self._pending = []
        self._sent = now or time.perf_counter()

    def emit(self, kind: str, value) -> None:
        """From the worker thread: hand an event to the submitting loop (a closed loop drops it)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def sampling(self) -> SamplingParams:
        r = self.req
        if r.temperature == 0 or r.top_p == 0:
            return SamplingParams(temperature=0.0, seed=r.seed)
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=0, seed=r.seed)


class Worker:
    def __init__(self, engine, queue_size: int):
        self.engine = engine
        self.session = engine.session()
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self._stop = threading.Event()
        self.served = self.cancelled = 0          # jobs finished; of them, stopped by their client

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with a 429 when the queue is full."""
        if self._stop.is_set():
            raise APIError(503, "the server is shutting down", kind="server_error")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.queue_size} requests are already waiting for the "
                           "one engine; retry shortly", kind="rate_limit_error", code="queue_full") from None

    def halt(self) -> None:
        """Take no more jobs and end the running one at its next token (a shutdown's first step:
        its stream then ends, so the HTTP server need not wait for it)."""
        self._stop.set()

    def close(self) -> None:
        """After ``run`` has returned: every job still waiting gets a 503."""
        self._stop.set()
        while True:
            try:
                self.jobs.get_nowait().emit("error", APIError(503, "the server is shutting down", kind="server_error"))
            except queue.Empty:
                return

    def run(self, alive=lambda: True) -> None:
        """Generate job after job until ``halt`` (or until ``alive()`` turns False)."""
        while not self._stop.is_set() and alive():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancelled.is_set():                # its client went away while it waited
                job.emit("done", Outcome(None, {}))
                continue
            self._generate(job)
            self.served += 1

    def _generate(self, job: Job) -> None:
        s, st = self.session, None
        try:
            gen = s.generate(job.ids, max_tokens=job.max_tokens, sampling=job.sampling(), stop=job.req.stop)
            try:
                for step in gen:
                    st = step.stats
                    if step.text:
                        job.text(step.text)
                    if job.cancelled.is_set() or self._stop.is_set():
                        self.cancelled += 1
                        job.flush()
                        job.emit("done", Outcome(None, {}))
                        return
            finally:
                gen.close()
        except FlashinferError as e:
            job.flush()
            job.emit("error", APIError(400, str(e)))
            return
        except Exception as e:                        # a bug: say so, and start the next job on a fresh cache
            log.exception("generation failed")
            self.session = self.engine.session()
            job.flush()
            job.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"))
            return
        if st is None:     # nothing generated: max_tokens 0, or an end-of-sequence token first
            reason, done, cached, timings = ("length" if job.max_tokens == 0 else "stop"), 0, s.reused, None
        else:
            reason, done, cached = st.finish_reason, st.generated_tokens, st.cached_tokens
            timings = {"prompt_tokens": st.prompt_tokens, "cached_tokens": cached, "prompt_ms": 1000 * st.prefill_s,
                       "predicted_tokens": done, "predicted_ms": 1000 * st.decode_s,
                       "predicted_per_second": st.decode_tokens_per_s if st.decode_tokens else None}
            log.info("request %s: %d prompt tokens (%d cached) in %.0f ms, %d generated at %.1f tok/s", job.req.id,
                     st.prompt_tokens, cached, 1000 * st.prefill_s, done, st.decode_tokens_per_s)
        job.flush()
        job.emit("done", Outcome(finish(reason), usage(len(job.ids), done, cached), timings))
