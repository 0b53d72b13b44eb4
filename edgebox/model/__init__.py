"""The transformer forward pass and the KV cache; tensor parallelism is the box's business."""

from edgebox.model.kv_cache import KVCache, Segment
from edgebox.model.transformer import Transformer

__all__ = ["KVCache", "Segment", "Transformer"]
