"""Errors raised at the boundaries of the project (bad checkpoints, bad bundles, bad options).

Every error here is meant to be shown to a user as one line: it names the bad value and the fix.
The CLI prints ``str(err)`` without a traceback.
"""


class FlashinferError(Exception):
    """Base class of every user-facing error of flashinfer-local."""


class CheckpointError(FlashinferError):
    """The source checkpoint (HF folder or GGUF) cannot be converted."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture or one of its options is not supported."""


class BundleError(FlashinferError):
    """A bundle is missing, truncated, corrupted or of the wrong format version."""
