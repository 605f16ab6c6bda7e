"""Text <-> token ids, chat templates, and text that grows token by token, from a bundle's tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path

from storage.errors import BundleError, FlashinferError
from storage.reader import Bundle

from . import bpe

log = logging.getLogger(__name__)


class _HFTokenizer:
    """HF ``tokenizers`` behind the interface of :class:`bpe.ByteLevelBPE`, for the files it lacks."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        self._tok = HFTokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocabulary(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def load_text_tokenizer(path: Path):
    """The lean byte-level BPE (:mod:`.bpe`, a few MiB) where it gives exactly the ids HF
    ``tokenizers`` would, else ``tokenizers`` itself (~10-20x the file's size in RSS). A file
    neither can read is a BundleError."""
    try:
        try:
            return bpe.load(path)
        except bpe.UnsupportedTokenizer as e:
            log.info("tokenizer: %s; using HF tokenizers", e)
            return _HFTokenizer(path)
    except FlashinferError:
        raise
    except Exception as e:               # tokenizers raises a bare Exception on a damaged file
        raise BundleError(f"{path}: unreadable tokenizer ({str(e)[:120]}); the bundle is damaged, re-run convert "
                          "(inspect --verify names damaged files)") from None


class Tokenizer:
    def __init__(self, bundle: Bundle):
        info = bundle.manifest["tokenizer"]
        self.chat_template = info.get("chat_template")
        self.bos_token, self.eos_token = info.get("bos_token"), info.get("eos_token")
        self.add_bos = bool(info.get("add_bos"))
        self.bos_token_id = bundle.config.bos_token_id
        self._tok = None
        self._template = None
        path = bundle.tokenizer_file
        if path is not None:
            self._tok = load_text_tokenizer(path)
        eos = set(bundle.config.eos_token_ids)
        if self._tok is not None and self.eos_token:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                eos.add(tid)
        self.eos_token_ids = frozenset(eos)

    @property
    def lean(self) -> bool:
        """Whether the lean BPE (not HF tokenizers) holds the vocabulary: what the budget plans for."""
        return not isinstance(self._tok, _HFTokenizer)

    @property
    def available(self) -> bool:
        """Whether text can be encoded/decoded (the bundle carries a tokenizer)."""
        return self._tok is not None

    def vocabulary(self) -> dict[str, int]:
        """Token -> id, special tokens included (a draft model must have the same)."""
        return self._need().vocabulary()

    def _need(self):
        if self._tok is None:
            raise FlashinferError("this bundle has no tokenizer (its checkpoint had no tokenizer.json); "
                                  "pass token ids instead of text")
        return self._tok

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` adds BOS the way the model expects."""
        ids = self._need().encode(text, add_special_tokens=special)
        if special and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._need().decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the checkpoint's chat template (jinja2) and tokenize it."""
        if not self.chat_template:
            raise FlashinferError("this model has no chat template; give plain text or token ids",
                                  cli="this model has no chat template; run without --chat")
        from jinja2 import TemplateError
        if self._template is None:           # compiled once: a chat template takes ~10-30 ms to compile
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise FlashinferError(f"chat template: {msg}")
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise FlashinferError(f"the model's chat template does not compile ({str(e)[:160]}); run without "
                                      "--chat") from None
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:            # incl. the sandbox's SecurityError on an escape attempt
            raise FlashinferError(f"the chat template refused these messages: {type(e).__name__}: {str(e)[:160]}") from None
        return self._need().encode(text, add_special_tokens=False)


class IncrementalDecoder:
    """The text of a growing list of tokens, one piece per token, in time linear in its length.

    Each step decodes only a short window: the tokens since the last emitted piece and the ones
    before it back to the previous emission (``prefix``), and emits what the new tokens add to the
    window's text. Decoding the window with its left context keeps what a tokenizer does at the
    start of a text (a stripped leading space) out of the difference. A piece that ends inside a
    multi-byte character (the decoder's U+FFFD) is held back until a later token completes it.
    The pieces joined, with ``flush()`` at the end, equal ``decode`` of all the tokens.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0   # window start; end of what has been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """What is still held back (half a character stays as U+FFFD, as a full decode shows it)."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
