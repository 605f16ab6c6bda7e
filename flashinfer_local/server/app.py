"""The OpenAI-compatible HTTP app (Starlette): ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` and ``/health``, in front of one :class:`~flashinfer_local.server.worker.Worker`.

A request is checked (``protocol.parse_request``), its prompt tokenized and measured against the
context, and queued; the response streams the worker's text as server-sent events or waits for all
of it. A client that goes away cancels its job. Every error, ours or Starlette's (404, 405), is an
OpenAI error body; nothing answers with a traceback.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from storage.errors import FlashinferError

from flashinfer_local.server import protocol as api
from flashinfer_local.server.worker import Job, Worker

log = logging.getLogger(__name__)

COMPLETION_TOKENS = 16      # /v1/completions without max_tokens, as OpenAI
POLL_S = 0.5                # how often a waiting response checks that its client is still there


def _error(e: api.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Server:
    """What the routes share: the engine's worker, the model's name, the API key, the context."""

    def __init__(self, engine, model_name: str, api_key: str | None = None, queue_size: int = 8):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.context = engine.kv_limit
        self.worker = Worker(engine, queue_size)
        self.started = int(time.time())
        if engine.tokenizer.chat_template:           # compile the template before the first request
            try:
                engine.encode_prompt([{"role": "user", "content": "hi"}])
            except Exception:                        # a template that needs more: the request will say
                pass

    # ------------------------------------------------------------ request -> job
    def _ids(self, req: api.Request) -> list[int]:
        try:
            return self.engine.encode_prompt(req.prompt)
        except FlashinferError as e:
            raise api.APIError(400, str(e), "messages" if req.chat else "prompt") from None
        except Exception as e:          # a chat template that refuses the messages (jinja2's own errors)
            raise api.APIError(400, f"the chat template refused these messages: {e}", "messages") from None

    def _budget(self, req: api.Request, ids: list[int]) -> int:
        """The tokens to generate, or a 400 when the prompt and max_tokens overrun the context."""
        room = self.context - len(ids)
        what = "messages" if req.chat else "prompt"
        if room <= 0:
            raise api.APIError(400, f"the prompt is {len(ids)} tokens; this server's context is {self.context} "
                               "tokens (serve --context); shorten it", what, code="context_length_exceeded")
        if req.max_tokens is None:
            return room if req.chat else min(COMPLETION_TOKENS, room)
        if req.max_tokens > room:
            raise api.APIError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({req.max_tokens}) exceed this "
                               f"server's context of {self.context} tokens; ask for at most {room} tokens",
                               "max_tokens", code="context_length_exceeded")
        return req.max_tokens

    async def _job(self, http: HTTPRequest, chat: bool) -> Job:
        req = api.parse_request(api.parse_body(await http.body()), chat)
        if req.model is not None and req.model != self.model_name:
            raise api.APIError(400, f"model {req.model!r} is not served here; this server runs {self.model_name!r} "
                               "(GET /v1/models)", "model", code="model_not_found")
        ids = await run_in_threadpool(self._ids, req)
        job = Job(req, ids, self._budget(req, ids), asyncio.get_running_loop())
        self.worker.submit(job)
        return job

    # ------------------------------------------------------------ routes
    async def completions(self, http: HTTPRequest, chat: bool = False):
        try:
            job = await self._job(http, chat)
        except api.APIError as e:
            return _error(e)
        if job.req.stream:
            return StreamingResponse(self._stream(http, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = []
        async for kind, value in self._events(http, job):
            if kind == "text":
                text += value
            elif kind == "error":
                return _error(value)
            elif value.reason is None:                     # cancelled: the client is gone
                return JSONResponse({}, status_code=499)
            else:
                return JSONResponse(api.response(job.req, self.model_name, "".join(text), value.reason, value.usage,
                                                       value.timings))
        return JSONResponse({}, status_code=499)                 # the client went away while it waited

    async def chat_completions(self, http: HTTPRequest):
        return await self.completions(http, chat=True)

    async def _events(self, http: HTTPRequest, job: Job):
        """The job's events until its end: ("text", [str]) ... then ("done", Outcome) or ("error",
        APIError). A watcher cancels the job when the client disconnects (the worker then ends it
        at its next token, or skips it if it is still waiting)."""
        async def watch():
            while not await http.is_disconnected():
                await asyncio.sleep(POLL_S)
            job.cancel()
        watcher = asyncio.create_task(watch())
        try:
            while True:
                kind, value = await job.events.get()
                yield kind, value
                if kind != "text":
                    return
        finally:
            watcher.cancel()
            job.cancel()

    async def _stream(self, http: HTTPRequest, job: Job):
        """Server-sent events; text that arrived while the last write went out leaves in one write."""
        req, name = job.req, self.model_name
        if req.chat:
            yield api.sse(api.chunk(req, name, role=True))
        out = []
        async for kind, value in self._events(http, job):
            if kind == "text":          # one event per token, written together
                out += [api.sse(api.chunk(req, name, text=piece)) for piece in value]
                if not job.events.empty():
                    continue
            elif kind == "error":
                out.append(api.sse(value.body()))
            elif value.reason is not None:
                out.append(api.sse(api.chunk(req, name, reason=value.reason, timings=value.timings)))
                if req.include_usage:
                    out.append(api.sse(api.chunk(req, name, use=value.usage)))
            yield b"".join(out)
            out = []
        yield b"".join(out) + api.sse(b"[DONE]")

    async def models(self, http: HTTPRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "flashinfer-local"}]})

    async def health(self, http: HTTPRequest):
        return JSONResponse({"status": "ok", "model": self.model_name, "waiting": self.worker.jobs.qsize(),
                             "served": self.worker.served, "cancelled": self.worker.cancelled})

    # ------------------------------------------------------------ the app
    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            try:
                yield
            finally:
                self.worker.halt()

        async def http_error(request, exc: HTTPException):
            msg = {404: f"no route {request.url.path}; this server answers /v1/chat/completions, "
                        "/v1/completions, /v1/models and /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
            return _error(api.APIError(exc.status_code, msg))

        async def server_error(request, exc: Exception):
            log.exception("request failed")
            return _error(api.APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

        app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], lifespan=lifespan, exception_handlers={HTTPException: http_error, Exception: server_error})
        if self.api_key:
            app.add_middleware(_APIKey, key=self.api_key)
        return app


class _APIKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str):
        self.inner, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                e = api.APIError(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                 "with the key given to serve --api-key", kind="invalid_request_error",
                                 code="invalid_api_key")
                await _error(e)(scope, receive, send)
                return
        await self.inner(scope, receive, send)
