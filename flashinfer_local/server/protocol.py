"""The OpenAI API's request and response shapes: a JSON body checked field by field into a
:class:`Request`, and the bodies and stream chunks sent back.

Every rejection is an :class:`APIError`, which the app turns into the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOPS = 4            # as OpenAI: at most four stop strings


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One generation request, checked. ``prompt`` is text (completions) or chat messages."""
    chat: bool
    prompt: str | list
    max_tokens: int | None            # None: until the context fills (chat) or the default (completions)
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"{name} must be a number from {lo} to {hi}, not {json.dumps(v)}", name)
    if not lo <= v <= hi:
        raise APIError(400, f"{name} {v} is out of range: it must be from {lo} to {hi}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be a whole number, not {json.dumps(v)}", name)
    if lo is not None and v < lo:
        raise APIError(400, f"{name} {v} must be at least {lo}", name)
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop")
    return [s for s in stops if s]


def _content(m: dict, i: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts joined."""
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts (this model reads "
                   "text only)", f"messages[{i}].content")


ROLES = ("system", "developer", "user", "assistant")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "messages is missing: send a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} is not one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if p is None:
        raise APIError(400, "prompt is missing: send the text to continue", "prompt")
    if not isinstance(p, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", "prompt")
    if not p:
        raise APIError(400, "prompt is empty: send some text to continue", "prompt")
    return p


def parse_request(body: dict, chat: bool) -> Request:
    """A checked :class:`Request` from a chat-completions (``chat``) or completions body."""
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise APIError(400, f"n {n}: this server generates one choice per request; send n=1", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = next((v for v in (_integer(body, k, 0) for k in names) if v is not None), None)
    return Request(
        chat=chat, prompt=_messages(body) if chat else _prompt(body), max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.7, 0.0, 2.0), top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        seed=_integer(body, "seed"), stop=_stops(body), stream=stream,
        include_usage=bool(opts.get("include_usage")), model=model)


# ---------------------------------------------------------------- what goes back
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish(reason: str | None) -> str:
    """The engine's finish reason (stop, eos, length) -> OpenAI's (stop, length)."""
    return "length" if reason == "length" else "stop"


def response(req: Request, model: str, text: str, reason: str, use: dict, timings: dict | None = None) -> dict:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        kind, prefix = "text_completion", "cmpl-"
    out = {"id": prefix + req.id, "object": kind, "created": req.created, "model": model,
           "choices": [choice], "usage": use}
    if timings:
        out["timings"] = timings          # not OpenAI's: the engine's own figures (clients ignore it)
    return out


def chunk(req: Request, model: str, text: str | None = None, reason: str | None = None, role: bool = False,
          use: dict | None = None, timings: dict | None = None) -> dict:
    """One server-sent event's body: a piece of text, the first (role) or last (reason) chunk, or
    the usage chunk (no choices)."""
    if req.chat:
        kind, prefix = "chat.completion.chunk", "chatcmpl-"
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    else:
        kind, prefix = "text_completion", "cmpl-"
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
    out = {"id": prefix + req.id, "object": kind, "created": req.created, "model": model,
           "choices": [] if use is not None else choices}
    if use is not None or req.include_usage:
        out["usage"] = use
    if timings:
        out["timings"] = timings
    return out


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
