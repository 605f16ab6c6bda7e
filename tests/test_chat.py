"""`chat` driven through a pseudo-terminal as a person would: turns, the cache reused by the next
turn, /stats, Ctrl-C mid-answer, /reset, a full context, Ctrl-D."""
import os
import re
import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def _spawn(bundle, *args):
    child = pexpect.spawn(sys.executable, ["-m", "flashinfer_local", "chat", str(bundle), "--temperature", "0",
                                           *args], encoding="utf-8", timeout=90, dimensions=(40, 200),
                          env={**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"})
    child.expect_exact(">>>")
    return child


def _stats(child) -> tuple[int, int, int]:
    """(exchanges, prompt tokens of the last turn, of them found in the cache) from /stats."""
    child.sendline("/stats")
    child.expect(r"conversation: (\d+) exchanges")
    n = int(child.match.group(1))
    child.expect(r"(\d+) prompt tokens, (\d+) found in the cache")
    prompt, cached = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(">>>")
    return n, prompt, cached


def test_chat_turns_reuse_the_cache_and_ctrl_c_stops_an_answer(smollm_bundle):
    child = _spawn(smollm_bundle("int8"), "-n", "300")
    child.sendline("What is the capital of China?")
    child.expect("Beijing")
    child.expect_exact(">>>")
    n, first, cached = _stats(child)
    assert (n, cached) == (1, 0)
    child.sendline("And of Russia?")
    child.expect("Moscow")
    child.expect_exact(">>>")
    n, second, cached = _stats(child)
    assert n == 2 and cached > first and second - cached <= 20     # only the new turn was computed

    child.sendline("Write a very long story about a dragon who learns to code.")
    child.expect_exact("code.")                         # the line as typed, then
    # the answer has started: more words than the line's echo and its re-rendering on Enter hold
    # (Ctrl-C sent while the prompt still owns the terminal would reach no one)
    child.expect(r"(\w+\W+){30}")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>>")
    assert _stats(child)[0] == 3                        # the stopped answer stays in the conversation

    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact(">>>")
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    child.expect_exact(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_a_full_context_offers_to_drop_the_oldest_turns(smollm_bundle):
    child = _spawn(smollm_bundle("int8"), "--context", "128", "-n", "40")
    child.sendline("What is the capital of China?")
    child.expect_exact(">>>")
    child.sendline("Tell me about " + "the history of China, " * 10)
    child.expect(r"exceeds the context of 128 tokens")
    child.expect_exact("drop the oldest turns to make room? [Y/n]")
    child.sendline("y")
    child.expect_exact(">>>")
    child.sendline("/stats")
    child.expect(r"conversation: (\d+) exchanges, (\d+) of 128 context tokens")
    assert child.match.group(1) == "1" and int(child.match.group(2)) <= 128
    child.expect_exact(">>>")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert "Traceback" not in re.sub(r"\s+", " ", child.before)


def test_ctrl_c_during_run_prints_the_text_and_its_figures(smollm_bundle):
    child = pexpect.spawn(sys.executable, ["-m", "flashinfer_local", "run", str(smollm_bundle("int8")), "--chat",
                                           "-p", "Write a very long story about a dragon.", "-n", "2000"],
                          encoding="utf-8", timeout=90)
    child.expect(r"\w+ \w+ \w+ \w+ \w+")
    child.sendintr()
    child.expect(r"\[stopped by Ctrl-C after (\d+) tokens\]")
    assert 0 < int(child.match.group(1)) < 2000
    child.expect(r"generated \d+ tokens, [\d.]+ tok/s")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in child.before
