"""`serve` against the official `openai` client: the real SmolLM2-135M behind a server started on a
free localhost port, one request at a time from a bounded queue."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

# answers SmolLM2-135M gives in f16 and int8 alike, with and without a reused cache
QUESTIONS = {"China": "Beijing", "Russia": "Moscow", "Germany": "Berlin", "Japan": "Tokyo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "flashinfer_local", "serve", str(bundle),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def raw(self, path: str, body: bytes | None, method: str = "POST", key: str | None = "k") -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def client(self, key: str = "k"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.proc.stderr.read()


@pytest.fixture(scope="module")
def server(smollm_bundle):
    s = Server(smollm_bundle("int8"), "--api-key", "k", "--context", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(smollm_bundle):
    """Room for one waiting request: what the 429, disconnect and shutdown tests need."""
    s = Server(smollm_bundle("int8"), "--queue", "1")
    yield s
    s.stop()


def _ask(c, country: str, **kw):
    return c.chat.completions.create(model="b", messages=[{"role": "user", "content":
                                     f"What is the capital of {country}?"}], max_tokens=24, temperature=0, **kw)


def test_models_and_health(server):
    (m,) = server.client().models.list().data
    assert m.id == "b" and m.owned_by == "flashinfer-local"
    assert server.health()["status"] == "ok"        # /health needs no key


def test_chat_completion_and_the_next_turn_reuses_the_cache(server):
    c = server.client()
    r = _ask(c, "France")
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens < 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": r.choices[0].message.content},
            {"role": "user", "content": "And of Spain?"}]
    r2 = c.chat.completions.create(model="b", messages=msgs, max_tokens=24, temperature=0)
    assert "Madrid" in r2.choices[0].message.content
    # the first turn's prompt and answer were in the cache: only the new turn was computed
    assert r2.usage.prompt_tokens_details.cached_tokens >= u.prompt_tokens + u.completion_tokens - 1


def test_streaming_chat_gives_the_same_text(server):
    c = server.client()
    whole = _ask(c, "Egypt").choices[0].message.content
    pieces, reasons, usage = [], [], None
    for ch in _ask(c, "Egypt", stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            pieces.append(ch.choices[0].delta.content or "")
            reasons.append(ch.choices[0].finish_reason)
        else:
            usage = ch.usage
    assert "".join(pieces) == whole and "Cairo" in whole
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens > 0


def test_completion_with_a_stop_string_and_length(server):
    c = server.client()
    r = c.completions.create(model="b", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    text = r.choices[0].text
    assert "5" in text and "7" not in text and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="b", prompt="1, 2, 3, 4,", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    pieces = [ch.choices[0].text for ch in c.completions.create(model="b", prompt="1, 2, 3, 4,", max_tokens=3,
                                                                 temperature=0, stream=True)]
    assert "".join(pieces) == r.choices[0].text


def test_seeded_sampling_repeats(server):
    c = server.client()
    a, b = ([c.completions.create(model="b", prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9,
                                  seed=7).choices[0].text for _ in range(2)])
    assert a == b


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"model": "b"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": {"x": 1}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),           # longer than --context 512
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, "max_tokens"),  # prompt + 500 > 512
])
def test_bad_requests_get_400_with_the_openai_error_body(server, body, param):
    status, out = server.raw("/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
    assert out["error"]["message"]


def test_malformed_bodies_routes_and_keys(server):
    for raw in (b"{not json", b"[1, 2]", b"null", b"\xff\xfe"):
        status, out = server.raw("/v1/chat/completions", raw)
        assert status == 400 and "JSON" in out["error"]["message"]
    status, out = server.raw("/v1/completions", json.dumps({"prompt": 5}).encode())
    assert status == 400 and out["error"]["param"] == "prompt"
    assert server.raw("/v1/nothing", b"{}")[0] == 404
    assert server.raw("/v1/chat/completions", None, method="GET")[0] == 405
    status, out = server.raw("/v1/models", None, method="GET", key=None)
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()


def test_four_concurrent_clients_are_all_answered(server):
    answers = {}

    def one(country):
        answers[country] = _ask(server.client(), country).choices[0].message.content
    threads = [threading.Thread(target=one, args=(k,)) for k in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {k: v in answers.get(k, "") for k, v in QUESTIONS.items()} == {k: True for k in QUESTIONS}


def _busy(c, tokens: int):
    """A streaming request that would run for ``tokens`` tokens, started (its first text seen)."""
    s = c.completions.create(model="b", prompt="A long story: once upon a time", max_tokens=tokens,
                             temperature=0, stream=True)
    it = iter(s)
    next(it)
    return s


def test_a_full_queue_gets_429_and_a_disconnect_cancels(small_server):
    c = small_server.client()
    before = small_server.health()["cancelled"]
    running = _busy(c, 1500)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.setdefault("r", c.completions.create(
        model="b", prompt="Hello", max_tokens=4, temperature=0)))
    t.start()
    deadline = time.time() + 30
    while small_server.health()["waiting"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    status, out = small_server.raw("/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(), key=None)
    assert status == 429 and out["error"]["type"] == "rate_limit_error"
    running.close()                                  # the client goes away mid-stream
    t.join(60)
    assert waiting["r"].usage.completion_tokens == 4
    assert small_server.health()["cancelled"] == before + 1


def test_shutdown_is_clean(smollm_bundle):
    s = Server(smollm_bundle("int8"))
    stream = _busy(s.client(), 1500)
    code, err = s.stop()                              # Ctrl-C while a generation streams
    stream.close()
    assert code == 0 and "Traceback" not in err, err


def test_a_port_in_use_is_a_clean_error(small_server):
    r = subprocess.run([sys.executable, "-m", "flashinfer_local", "serve", "nowhere-model", "--port",
                        str(small_server.port)], capture_output=True, text=True, timeout=60,
                       env={**os.environ})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{small_server.port}" in r.stderr


def test_a_model_larger_than_its_budget_is_served_streamed(smollm_bundle):
    s = Server(smollm_bundle("int8"), "--offload", "window", "--dram-budget", "220MiB")
    try:
        r = _ask(s.client(), "Japan")
        assert "Tokyo" in r.choices[0].message.content
    finally:
        code, err = s.stop()
    assert "streamed from the SSD: window offload, budget 220.00MiB" in err and code == 0
