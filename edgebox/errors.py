"""Errors a user can act on. Each message is one line: what, where, what to do."""


class EdgeboxError(Exception):
    """Base of every error edgebox raises on purpose; the CLI prints it as one line."""


class ModelError(EdgeboxError):
    """A model file that cannot be used: not a GGUF, broken, hostile or unsupported."""


class ContextOverflowError(EdgeboxError):
    """A prompt (plus the tokens asked for) does not fit in the context window."""
