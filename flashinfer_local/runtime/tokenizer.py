"""Text <-> token ids, and chat templates, from a bundle's tokenizer facts."""
from __future__ import annotations

from storage.errors import FlashinferError
from storage.reader import Bundle


class Tokenizer:
    def __init__(self, bundle: Bundle):
        info = bundle.manifest["tokenizer"]
        self.chat_template = info.get("chat_template")
        self.bos_token, self.eos_token = info.get("bos_token"), info.get("eos_token")
        self.add_bos = bool(info.get("add_bos"))
        self.bos_token_id = bundle.config.bos_token_id
        self._tok = None
        path = bundle.tokenizer_file
        if path is not None:
            from tokenizers import Tokenizer as HFTokenizer
            self._tok = HFTokenizer.from_file(str(path))
        eos = set(bundle.config.eos_token_ids)
        if self._tok is not None and self.eos_token:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                eos.add(tid)
        self.eos_token_ids = frozenset(eos)

    @property
    def available(self) -> bool:
        """Whether text can be encoded/decoded (the bundle carries a tokenizer)."""
        return self._tok is not None

    def _need(self):
        if self._tok is None:
            raise FlashinferError("this bundle has no tokenizer (its checkpoint had no tokenizer.json); "
                                  "pass token ids instead of text")
        return self._tok

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special`` adds BOS the way the model expects."""
        ids = self._need().encode(text, add_special_tokens=special).ids
        if special and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._need().decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the checkpoint's chat template (jinja2) and tokenize it."""
        if not self.chat_template:
            raise FlashinferError("this model has no chat template; run without --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise FlashinferError(f"chat template: {msg}")
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        return self._need().encode(text, add_special_tokens=False).ids
