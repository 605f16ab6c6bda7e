"""Errors raised at the boundaries of the project (bad checkpoints, bad bundles, bad options).

Every error here is meant to be shown to a user as one line: it names the bad value and the fix.
The CLI prints ``err.cli_message`` without a traceback: the library's own text, or where the fix is
a command-line flag, the same sentence in the CLI's words (``cli=``), so that library errors
speak of arguments and the CLI of flags.
"""


class FlashinferError(Exception):
    """Base class of every user-facing error of flashinfer-local."""

    def __init__(self, message: str = "", cli: str | None = None):
        super().__init__(message)
        self.cli_message = cli or message


class OptionError(FlashinferError):
    """A bad value of an option: ``option`` as the Python API names it, ``flag`` as the CLI does
    (default: the name with dashes); ``problem`` follows the name, e.g. "-1 must be >= 0"."""

    def __init__(self, option: str, problem: str, flag: str | None = None):
        flag = flag or "--" + option.replace("_", "-")
        super().__init__(f"{option} {problem}", cli=f"{flag} {problem}")
        self.option = option


class CheckpointError(FlashinferError):
    """The source checkpoint (HF folder or GGUF) cannot be converted."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture or one of its options is not supported."""


class BundleError(FlashinferError):
    """A bundle is missing, truncated, corrupted or of the wrong format version."""
