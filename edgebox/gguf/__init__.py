"""GGUF files: the bounds-checked reader, the loader, ``ModelArgs`` per architecture, the quant-type table."""
