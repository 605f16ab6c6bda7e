"""Ctrl-C as a request to stop at the next token, not a traceback."""
from __future__ import annotations

import signal


class StopOnInterrupt:
    """Within the block, the first Ctrl-C sets ``hit`` (the loop stops at the next token); a
    second one interrupts at once."""

    def __enter__(self):
        self.hit = False
        self._prev = signal.signal(signal.SIGINT, self._on)
        return self

    def _on(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._prev)
        return False
