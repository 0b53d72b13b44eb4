"""Many concurrent requests over one model: continuous batching, chunked prefill, KV budget."""

from edgebox.engine.engine import Engine, EngineStats
from edgebox.engine.request import Chunk, Event, Handle, KVBudgetError, QueueFullError, Request, Summary

__all__ = ["Chunk", "Engine", "EngineStats", "Event", "Handle", "KVBudgetError", "QueueFullError", "Request", "Summary"]
