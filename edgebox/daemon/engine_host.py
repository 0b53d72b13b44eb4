"""The model the box serves and its engine, kept warm (hot standby) and swapped on load_model.

States: ``unloaded`` -> ``ready`` (model mapped, engine warmed up) -> ``loading`` (swapping) ->
``ready``. Loading opens the new file *before* touching the running engine, so a bad path or a
broken file leaves the old model serving; only the swap itself (cancel, close, warm up) is
unavailable time; the host lets the old model go before the new one warms up.

``submit`` refuses a prompt that cannot fit before tokenizing it (``certainly_too_long``):
tokenizing holds the GIL (a 200 kB prompt: ~0.2 s), and a flood of over-long prompts must not
cost that per prompt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgebox.errors import ContextOverflowError, EdgeboxError


class Unavailable(EdgeboxError):
    """No engine can take the request now (no model, a model loading, shutting down): code 503."""


class Busy(EdgeboxError):
    """Another load or unload is under way: code 409."""


class ModelHost:
    def __init__(
        self,
        *,
        max_batch: int,
        max_queue: int,
        kv_budget_bytes: int | None,
        power=None,
        backend: str = "auto",
        spec: tuple[str, int, Path | None] = ("none", 8, None),
        cache_types: tuple[str, str] = ("f16", "f16"),
    ):
        self.max_batch, self.max_queue, self.kv_budget_bytes = max_batch, max_queue, kv_budget_bytes
        self.backend = backend
        self.spec = spec  # (kind, draft_max, draft model file): engine.speculative
        self.cache_types = cache_types  # the KV cache's K and V types (llama.cpp's --cache-type-k/-v)
        self.power = power  # BoxPower: firmware + governor of the loaded model
        self.state = "unloaded"
        self.info: dict | None = None
        self._model = None
        self._engine = None
        self._longest_token = 1  # bytes of the model's longest token text
        self._lock = threading.Lock()  # guards the fields above
        self._switch = threading.Lock()  # one load/unload at a time

    @property
    def busy(self) -> bool:
        return self._switch.locked()

    def load(self, path: Path | None, chips: int, ctx: int | None, before_swap: Callable[[], None] = lambda: None) -> dict:
        """Open ``path`` (None: the bundled model), then swap it in. ``before_swap`` runs once the
        new file is known good and new requests are refused, before the old engine is closed
        (the caller cancels its requests there, giving each a reason)."""
        import edgebox
        from edgebox.engine import Engine
        from edgebox.engine.speculative import Speculative, check_draft_vocab

        if not self._switch.acquire(blocking=False):
            raise Busy("a model is already being loaded or unloaded; retry when it is done")
        try:
            t0 = time.perf_counter()
            model = edgebox.load(
                path,
                chips=chips,
                n_ctx=ctx,
                backend=self.backend,
                cache_type_k=self.cache_types[0],
                cache_type_v=self.cache_types[1],
            )  # ModelError leaves the old model serving
            kind, draft_max, draft_path = self.spec
            speculative, draft = Speculative(kind, draft_max, model_draft=draft_path and str(draft_path)), None
            if kind == "draft":
                if draft_path is None:
                    raise EdgeboxError(
                        "spec draft needs model_draft (--model-draft FILE): a smaller GGUF with the model's tokenizer"
                    )
                draft = edgebox.load(draft_path, chips=1, n_ctx=ctx, backend=self.backend)
                check_draft_vocab(model, draft)
            longest = longest_token_bytes(model.tokenizer)  # while the old model still serves
            with self._lock:
                old, self._engine, self.state = self._engine, None, "loading"
            before_swap()
            if old is not None:
                old.close(drain=False)
            # the old model's memory goes now (with its firmware, at install), not after the warm-up
            with self._lock:
                self._model = old = None
            try:
                if self.power is not None:
                    self.power.install(model)  # before the warm-up's first step
                engine = Engine(
                    model,
                    max_batch=self.max_batch,
                    max_queue=self.max_queue,
                    kv_budget_bytes=self.kv_budget_bytes,
                    speculative=speculative,
                    draft_model=draft,
                )
                if self.power is not None:
                    self.power.attach(engine)
            except Exception:
                if self.power is not None:
                    self.power.detach()
                with self._lock:
                    self._model, self.info, self.state = None, None, "unloaded"
                raise
            info = {
                "path": str(model.path),
                "name": Path(model.path).name,
                "arch": type(model.args).__name__,
                "n_ctx": model.n_ctx,
                "n_ctx_train": model.args.n_ctx_train,
                "n_vocab": model.args.n_vocab,
                "n_params": sum(t.n_values for t in model.file.tensors.values()),
                "quant_mix": quant_mix(model.file.tensors.values()),
                "chips": chips,
                "backend": self.backend,
                "cache_type_k": self.cache_types[0],
                "cache_type_v": self.cache_types[1],
                "size_bytes": Path(model.path).stat().st_size,
                "load_s": round(time.perf_counter() - t0, 3),
                "warmup_s": round(engine.warmup_s, 3),
                "loaded_at": time.time(),
            }
            with self._lock:
                self._model, self._engine, self.info, self.state = model, engine, info, "ready"
                self._longest_token = longest
            return info
        finally:
            self._switch.release()

    def unload(self, before_close: Callable[[], None] = lambda: None) -> None:
        if not self._switch.acquire(blocking=False):
            raise Busy("a model is being loaded or unloaded; retry when it is done")
        try:
            with self._lock:
                old, self._engine, self.state = self._engine, None, "unloaded"
                self._model, self.info = None, None
            before_close()
            if old is not None:
                old.close(drain=False)
            if self.power is not None:
                self.power.detach()
        finally:
            self._switch.release()

    def submit(self, request, on_event):
        """Queue a generate on the engine; raises Unavailable, or the engine's own errors
        (ContextOverflowError, KVBudgetError, QueueFullError, EdgeboxError for a bad prompt)."""
        with self._lock:
            engine, state, longest = self._engine, self.state, self._longest_token
        if engine is None:
            raise Unavailable(
                "a model is loading; retry in a few seconds"
                if state == "loading"
                else "no model is loaded; send load_model first"
            )
        if request.prompt is not None and not request.context_shift:
            at_least = certainly_too_long(request.prompt, engine.model.n_ctx, longest)
            if at_least:
                raise ContextOverflowError(
                    f"the prompt has at least {at_least} tokens but the context holds {engine.model.n_ctx} "
                    "(and at least one must be generated); shorten it or enable context_shift"
                )
        try:
            return engine.submit(request, on_event=on_event)
        except EdgeboxError:
            if self._engine is not engine:  # closed under us by a swap or shutdown
                raise Unavailable("the model was unloaded while the request arrived; retry") from None
            raise

    def set_max_queue(self, n: int) -> None:
        self.max_queue = n
        with self._lock:
            if self._engine is not None:
                self._engine.max_queue = n

    def stats(self) -> dict | None:
        with self._lock:
            engine = self._engine
        if engine is None:
            return None
        s = engine.stats()
        return {
            "running": s.running,
            "queued": s.queued,
            "batch_limit": s.batch_limit,
            "tokens_per_s": round(s.tokens_per_s, 2),
            "kv_used_bytes": s.kv_used_bytes,
            "kv_budget_bytes": s.kv_budget_bytes,
            "steps": s.steps,
            "generated_tokens": s.generated_tokens,
            # running counters of the chips' energy since the model loaded: all of it, and the part
            # spent idle between steps (charged to no request; the rest is the requests')
            "energy": {"total_j": round(s.energy_j + s.idle_energy_j, 6), "idle_j": round(s.idle_energy_j, 6)},
        }

    @property
    def engine(self):
        """The running engine (the power governor turns ``engine.batch_limit``), or None."""
        return self._engine

    def close(self) -> None:
        with self._lock:
            old, self._engine, self.state = self._engine, None, "unloaded"
        if old is not None:
            old.close(drain=False)
        if self.power is not None:
            self.power.close()


def quant_mix(tensors) -> dict[str, float]:
    """Each GGML type's share of the weight bytes (a Q4_K_M file: mostly Q4_K, some Q6_K)."""
    mix: dict[str, int] = {}
    for t in tensors:
        name = getattr(t.qtype, "name", str(t.qtype))
        mix[name] = mix.get(name, 0) + t.nbytes
    total = max(1, sum(mix.values()))
    return {name: round(n / total, 4) for name, n in sorted(mix.items(), key=lambda kv: -kv[1])}


def longest_token_bytes(tokenizer) -> int:
    return max((len(tokenizer.token_to_piece(i)) for i in range(tokenizer.n_vocab)), default=1) or 1


def certainly_too_long(prompt: str, n_ctx: int, longest_token: int) -> int:
    """A lower bound on the prompt's tokens when that alone proves it cannot fit (else 0): every
    token stands for at most ``longest_token`` bytes of the text, so a prompt of B bytes has at
    least ceil(B / longest_token) tokens. Cheap, and never wrong: it only spares the tokenizer."""
    if len(prompt) * 4 <= (n_ctx - 1) * longest_token:  # 4 bytes per character at most
        return 0
    at_least = -(-len(prompt.encode("utf-8", "surrogatepass")) // longest_token)
    return at_least if at_least >= n_ctx else 0
