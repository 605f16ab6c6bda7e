"""`chat` (a multi-turn conversation in the terminal) and `serve` (an OpenAI-compatible local server)."""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from pathlib import Path

import click

from storage.errors import FlashinferError

from flashinfer_local.cli.app import _stats_lines, main
from flashinfer_local.cli.interrupt import StopOnInterrupt
from flashinfer_local.cli.options import dtype_option, engine_options, sampling_options, take_engine_options
from flashinfer_local.units import fmt_bytes

COMMANDS = {"/reset": "forget the conversation (the system message stays)",
            "/system TEXT": "set the system message (empty: none) and start over",
            "/stats": "speed, memory and cache figures of the last answer",
            "/exit": "leave (Ctrl-D too)"}


def open_engine(model, dtype: str, opts):
    """MODEL (bundle, checkpoint, known name, or None: the default) -> (an open Engine, its name)."""
    from flashinfer_local.runtime.engine import Engine
    from flashinfer_local.workflows.resolve import resolve_run
    path, opts = resolve_run(model, dtype, opts, progress=sys.stderr.isatty())
    click.echo(f"opening {path} ...", err=True)
    return Engine(path, opts), (model if model and not Path(model).exists() else path.name)


def _reader():
    """A line reader: prompt_toolkit with history in a terminal, plain lines from a pipe."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        from flashinfer_local.workflows.fetch import cache_root
        hist = cache_root() / "chat_history"
        hist.parent.mkdir(parents=True, exist_ok=True)
        ps = PromptSession(history=FileHistory(str(hist)))
        return lambda text: ps.prompt(text)

    def plain(text):
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    return plain


def _ask(read, question: str) -> bool:
    try:
        return read(f"{question} [Y/n] ").strip().lower() in ("", "y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def _answer(conv, read, line: str) -> None:
    """One turn: fit it in the context (offering to drop the oldest turns), then stream the answer."""
    from flashinfer_local.workflows.conversation import ContextFull
    while True:
        try:
            conv.plan(line)
            break
        except ContextFull as e:
            click.echo(str(e), err=True)
            if not e.can_drop or not _ask(read, "drop the oldest turns to make room?"):
                return
            while conv.drop_oldest():
                try:
                    conv.plan(line)
                    break
                except ContextFull:
                    continue
    with StopOnInterrupt() as intr:
        try:
            for step in conv.reply(line, stop=lambda: intr.hit):
                click.echo(step.text, nl=False)
            click.echo()
        except KeyboardInterrupt:
            click.echo("\n[interrupted; the next turn computes the conversation again]", err=True)
            conv.session = conv.engine.session()
            return
    if intr.hit:
        click.echo("[stopped]", err=True)
    elif conv.last is not None and conv.last.finish_reason == "length" and conv.tokens + 1 >= conv.context:
        click.echo("[the context is full: /reset, or the next turn offers to drop the oldest turns]", err=True)


def _stats(conv, eng) -> None:
    click.echo(f"conversation: {len(conv.turns) // 2} exchanges, {conv.tokens} of {conv.context} context tokens "
               "in the cache", err=True)
    st = conv.last
    if st is None:
        click.echo("no answer yet", err=True)
        return
    click.echo(f"last turn: {st.prompt_tokens} prompt tokens, {st.cached_tokens} found in the cache, "
               f"{st.prompt_tokens - st.cached_tokens} computed", err=True)
    for line in _stats_lines(st, eng.runtime_baseline_bytes, eng.dram_budget):
        click.echo(line, err=True)


@main.command()
@click.argument("model", required=False)
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per answer at most.")
@sampling_options
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--system", default=None, help="A system message before the conversation.")
@dtype_option
@engine_options
def chat(model, max_tokens, temperature, top_p, top_k, seed, system, dtype, **engine):
    """Talk with MODEL in the terminal, turn by turn (its chat template; earlier turns stay in the
    KV cache). /reset, /system TEXT, /stats, /exit; Ctrl-C stops an answer, Ctrl-D leaves."""
    from flashinfer_local.runtime.sampling import SamplingParams
    from flashinfer_local.workflows.conversation import Conversation
    opts = take_engine_options(engine)
    sampling = SamplingParams(temperature, top_p, top_k, seed)
    eng, name = open_engine(model, dtype, opts)
    if not eng.tokenizer.chat_template:
        eng.close()
        raise FlashinferError(f"{name} has no chat template; use run -p for plain continuation")
    conv = Conversation(eng, system, max_tokens, sampling)
    read = _reader()
    click.echo(f"chatting with {name} ({_mode(eng)}, context {conv.context} tokens); "
               + ", ".join(COMMANDS) + "; Ctrl-C stops an answer", err=True)
    try:
        while True:
            try:
                line = read(">>> ").strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not line:
                continue
            cmd, _, arg = line.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                break
            elif cmd == "/reset":
                conv.reset()
                click.echo("[conversation cleared]", err=True)
            elif cmd == "/system":
                conv.set_system(arg.strip())
                conv.reset()
                click.echo(f"[system message {'set' if arg.strip() else 'removed'}; conversation cleared]", err=True)
            elif cmd == "/stats":
                _stats(conv, eng)
            elif cmd.startswith("/") and cmd.count("/") == 1:          # (a path is a message)
                click.echo(f"unknown command {cmd}: " + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()), err=True)
            else:
                _answer(conv, read, line)
    finally:
        eng.close()


def _mode(eng) -> str:
    return "all in DRAM" if eng.offload == "none" else f"streamed from the SSD: {eng.offload} offload"


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise FlashinferError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                              "(or stop what holds it)") from None


@main.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to your network: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on every request but /health.")
@click.option("--queue", "queue_size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests that may wait while one generates; more get 429.")
@dtype_option
@engine_options
def serve(model, host, port, api_key, queue_size, dtype, **engine):
    """Serve MODEL over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, /health.
    One generation at a time; a request that extends the previous conversation reuses its KV cache."""
    import uvicorn

    from flashinfer_local.server.app import Server
    opts = take_engine_options(engine)
    _check_port(host, port)
    eng, name = open_engine(model, dtype, opts)
    try:
        srv = Server(eng, name, api_key, queue_size)
        web = uvicorn.Server(uvicorn.Config(srv.app(), host=host, port=port, log_level="warning",
                                            access_log=False, timeout_graceful_shutdown=10))
        http = threading.Thread(target=web.run, name="http", daemon=True)    # its event loop; the
        http.start()                                                         # generation stays here

        def stop(signum, frame):          # Ctrl-C: end the running generation, then the server
            srv.worker.halt()
            web.should_exit = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        while not web.started and http.is_alive():
            time.sleep(0.05)
        if not web.started:
            raise FlashinferError(f"the server could not start on {host}:{port}; see the message above")
        budget = f", budget {fmt_bytes(eng.dram_budget)}" if eng.dram_budget else ""
        click.echo(f"serving {name} ({_mode(eng)}{budget}, context {srv.context} tokens) at "
                   f"http://{host}:{port}/v1 ; Ctrl-C stops", err=True)
        srv.worker.run(alive=http.is_alive)
        srv.worker.close()                # waiting requests get 503
        web.should_exit = True
        http.join(15)
        click.echo(f"stopped after {srv.worker.served} requests", err=True)
    finally:
        eng.close()
