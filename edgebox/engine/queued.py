"""A request's life before it runs: its prompt tokenized (``prompt_ids``, on the submitter's
thread: a too-long prompt is refused or, with ``context_shift``, truncated as llama.cpp does), its
output constraint compiled, its KV reservation (``reservation``) checked against the budget, and
its place in the queue (``Queued``: rank, and the summary it ends with if it never runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgebox.engine.request import PRIORITIES, Handle, KVBudgetError, Request, Summary
from edgebox.errors import ContextOverflowError, EdgeboxError
from edgebox.text.chat import THINK_OPEN
from edgebox.text.grammar import Constraint, compile_constraint
from edgebox.text.tool_calls import plan_tools


@dataclass(eq=False)
class Queued:
    """A request waiting for a slot, its prompt already tokenized (on the submitter's thread)."""

    handle: Handle
    ids: list[int]  # the prompt's tokens (truncated when it was too long and context_shift is on)
    reserved: int  # KV slots it holds once running: ``reservation``
    thinking_open: bool  # the chat template opened a <think> block
    truncated: int  # prompt tokens dropped
    constraint: Constraint | None = None  # what the output must match: response_format, or a forced tool call
    t_submit: float = 0.0  # set when it joins the queue

    @classmethod
    def prepare(cls, model, handle: Handle, kv_budget_bytes: int, kv_bytes_per_token: int) -> Queued:
        """Tokenize the request's prompt and reserve its KV; raises as ``Engine.submit`` does."""
        try:
            handle.request.params.check(model.args.n_vocab)  # logit_bias ids: refused now, not at the first token
        except ValueError as e:
            raise EdgeboxError(str(e)) from None
        r = handle.request
        ids, thinking_open, truncated = prompt_ids(model, r)
        constraint = r.response_format
        if r.tools:  # the reply's tool-call parser for the transports; a forced call's grammar
            handle.tool_plan = plan_tools(
                model.chat_template, r.tools, r.tool_choice, template_name=Path(model.path).name, thinking_open=thinking_open
            )
            if handle.tool_plan.grammar is not None:
                if constraint is not None:
                    raise EdgeboxError(
                        "response_format and a forced tool call (tool_choice required or a function) cannot be combined"
                    )
                constraint = Constraint.lark(handle.tool_plan.grammar)
        if constraint is not None:  # a grammar that does not compile: refused here (400)
            compile_constraint(model.tokenizer, constraint)
        reserved = reservation(handle.request, len(ids), model.n_ctx)
        need = reserved * kv_bytes_per_token
        if need > kv_budget_bytes:
            raise KVBudgetError(
                f"request needs {need / 2**20:.0f} MiB of KV cache, the budget is {kv_budget_bytes / 2**20:.0f} MiB; lower max_tokens or raise the KV budget"
            )
        return cls(handle, ids, reserved, thinking_open, truncated, constraint)

    @property
    def rank(self) -> int:
        """Admission class: 0 interactive, 1 batch (lower first)."""
        return PRIORITIES.index(self.handle.request.priority)

    def cancelled_summary(self, now: float) -> Summary:
        waited = now - self.t_submit
        return Summary(
            self.handle.request_id, "cancelled", "", "", "", prompt_tokens=len(self.ids), queue_s=waited, total_s=waited
        )

    def refused_summary(self, now: float, retry_after_s: float) -> Summary:
        """Its deadline passed while it waited: the one-line error and when to retry."""
        waited = now - self.t_submit
        error = (
            f"deadline_s {self.handle.request.deadline_s:g} passed before the request could start "
            f"(waited {waited:.2f} s); retry after {retry_after_s:.1f} s"
        )
        return Summary(
            self.handle.request_id,
            "error",
            "",
            "",
            "",
            prompt_tokens=len(self.ids),
            queue_s=waited,
            total_s=waited,
            error=error,
            retry_after_s=retry_after_s,
        )


def reservation(r: Request, n_prompt: int, n_ctx: int) -> int:
    """KV slots a request holds while it runs: its prompt plus max_tokens, within the context
    (all of it when it may shift the context)."""
    return n_ctx if r.context_shift else min(n_ctx, n_prompt + r.max_tokens)


def prompt_ids(model, r: Request) -> tuple[list[int], bool, int]:
    """(the prompt's tokens, whether the chat template left a <think> block open, tokens dropped).

    A prompt that fills the context is refused, or with ``context_shift`` truncated as llama.cpp
    does: keep ``n_keep`` tokens, drop whole blocks of half the rest after them."""
    if r.tools and r.messages is None:
        raise EdgeboxError("tools need chat messages (the chat template renders them), not a raw prompt")
    if r.prompt_ids is not None:
        ids, thinking_open = list(r.prompt_ids), False
        bad = next((t for t in ids if not 0 <= t < model.args.n_vocab), None)
        if bad is not None:
            raise EdgeboxError(f"prompt token {bad} is not in the vocabulary (0 to {model.args.n_vocab - 1})")
    else:
        if r.messages is not None:
            text = model.render_chat(list(r.messages), tools=r.tools, tool_choice=r.tool_choice)
            thinking_open = text.rstrip().endswith(THINK_OPEN)
        else:
            text, thinking_open = r.prompt, False
        ids = model.tokenize_prompt(text)
    if not ids:
        raise EdgeboxError("the prompt is empty and the model adds no BOS token; give a prompt")
    n_ctx, truncated = model.n_ctx, 0
    if len(ids) >= n_ctx:
        if not r.context_shift:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (and at least one must be generated); shorten it or enable context_shift"
            )
        n_keep = min(r.n_keep, n_ctx // 2)
        block = (n_ctx - n_keep) // 2
        erased = (len(ids) - n_keep - block) // block
        kept = ids[:n_keep] + ids[n_keep + erased * block :]
        truncated, ids = len(ids) - len(kept), kept
    return ids, thinking_open, truncated
