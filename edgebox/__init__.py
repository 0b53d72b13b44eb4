"""edgebox: an edge LLM inference runtime for power-capped boxes.

Public API (tests, tools and the daemon use only this)::

    import edgebox
    m = edgebox.load("model.gguf")      # errors are edgebox.ModelError
    m.tokenize("text"); m.detokenize(ids); m.logits(ids); m.generate(prompt, ...)

Names are imported on first use, so ``import edgebox.gguf.file`` (tools) or the CLI's ``--help``
does not pay for numba and the tokenizer library.
"""

from edgebox.errors import ContextOverflowError, EdgeboxError, ModelError

_LAZY = {
    "load": "api",
    "Model": "api",
    "default_model_path": "api",
    "SamplingParams": "text.sampler",
}

__all__ = ["EdgeboxError", "ModelError", "ContextOverflowError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edgebox' has no attribute {name!r}")
