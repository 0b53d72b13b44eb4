"""llama.cpp's sampler settings as request fields, shared by the MQTT ``generate`` command and the
HTTP API: the same names, ranges and conversion to ``SamplingParams`` on both transports; and the
scheduling fields (``Scheduling``: priority, deadline) both take too.

Every field is optional (None: the sampler's default, llama.cpp's); ``SamplingParams`` checks the
values once more and its errors name the field, so a body gets a 400 either way.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from edgebox.text.sampler import SamplingParams


class Scheduling(BaseModel):
    priority: Literal["interactive", "batch"] = Field(
        "interactive",
        description="edgebox: interactive work is admitted first; batch-only work runs at the most energy-efficient clock",
    )
    deadline_s: float | None = Field(
        None,
        gt=0.0,
        le=86400.0,
        description="edgebox: refuse (429 with retry_after_s) if the request cannot start within this many seconds",
    )


class SamplerExtras(BaseModel):
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | list[Annotated[list[float], Field(min_length=2, max_length=2)]] | None = Field(
        None, description='token id -> bias added to its logit ({"1234": -100} all but bans it); llama.cpp\'s [[id, bias]] too'
    )
    typical_p: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp: locally typical sampling (1: off)")
    top_n_sigma: float | None = Field(
        None, le=1000.0, description="llama.cpp: keep logits within n sigmas of the top (<= 0: off)"
    )
    mirostat: int | None = Field(None, ge=0, le=2, description="llama.cpp: mirostat v1 or v2 (0: off)")
    mirostat_tau: float | None = Field(None, ge=0.0, le=100.0)
    mirostat_eta: float | None = Field(None, ge=0.0, le=10.0)
    dry_multiplier: float | None = Field(None, ge=0.0, le=100.0, description="llama.cpp: DRY repetition penalty (0: off)")
    dry_base: float | None = Field(None, ge=1.0, le=100.0)
    dry_allowed_length: int | None = Field(None, ge=0, le=1_000_000)
    dry_penalty_last_n: int | None = Field(None, ge=-1, le=1_000_000)
    dry_sequence_breakers: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None, max_length=64
    )
    xtc_probability: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp: exclude top choices (0: off)")
    xtc_threshold: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool | None = Field(None, description="llama.cpp: never end at an end-of-generation token")
    samplers: list[str] | str | None = Field(
        None, description='llama.cpp\'s sampler order, a list or "top_k;top_p;..." (default its own order)'
    )


def sampler_settings(body: BaseModel) -> dict[str, Any]:
    """The sampler settings a body gives (None: the sampler's default), in ``SamplingParams``'s
    terms: OpenAI's string-keyed ``logit_bias`` as token ids, a ``samplers`` string split on ';'."""
    names = [f.name for f in fields(SamplingParams)]
    given = {k: getattr(body, k) for k in names if getattr(body, k, None) is not None}
    bias = given.get("logit_bias")
    pairs = bias.items() if isinstance(bias, dict) else bias or ()
    try:
        ids = [int(k) if isinstance(k, str) else k for k, _ in pairs]
    except ValueError:
        raise ValueError(f"logit_bias: keys must be token ids (integers as strings), got {[k for k, _ in pairs][:3]}") from None
    if any(not float(t).is_integer() for t in ids):
        raise ValueError(f"logit_bias: token ids must be integers, got {[t for t in ids if not float(t).is_integer()][:3]}")
    if bias is not None:
        given["logit_bias"] = {int(t): v for t, (_, v) in zip(ids, pairs)}
    if isinstance(given.get("samplers"), str):
        given["samplers"] = tuple(n for n in given["samplers"].split(";") if n)
    elif "samplers" in given:
        given["samplers"] = tuple(given["samplers"])
    if "dry_sequence_breakers" in given:
        given["dry_sequence_breakers"] = tuple(given["dry_sequence_breakers"])
    return given
