"""The MQTT final reply's ``energy`` object: the engine's ``Summary.energy`` as sent."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edgebox.daemon.schemas import EnergyUsage, FinalReply, encode
from edgebox.engine.energy import Energy


def test_final_reply_carries_the_energy_fields():
    energy = Energy(joules=0.0123456789, joules_per_token=0.00123456789, prefill_j=0.002, decode_j=0.0103456789, avg_w=3.21987)
    reply = FinalReply(request_id="r1", seq=5, status="ok", code=200, energy=EnergyUsage(**energy.as_dict()))
    sent = json.loads(encode(reply))
    assert sent["energy"] == {
        "joules": 0.012346,
        "joules_per_token": 0.001235,
        "prefill_j": 0.002,
        "decode_j": 0.010346,
        "avg_w": 3.22,
    }


def test_no_tokens_no_per_token_figure():
    """A request cancelled before its first token: its joules, and no joules_per_token."""
    sent = json.loads(encode(FinalReply(request_id="r2", seq=0, status="ok", code=200, energy=EnergyUsage(**Energy().as_dict()))))
    assert sent["energy"] == {"joules": 0.0, "prefill_j": 0.0, "decode_j": 0.0, "avg_w": 0.0}


def test_energy_fields_are_required():
    with pytest.raises(ValidationError, match="prefill_j"):
        EnergyUsage(joules=1.0, decode_j=1.0, avg_w=1.0)
