"""Shared fixtures: the tiny models (real tokenizers, built once per run) and micro GGUFs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import tiny_models
from tests.fixtures.micro import write_micro_gguf
from tests.fixtures.paths import DATA


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory):
    """Build (once per run) the F32 tiny model named ``name`` and check it is the file llama.cpp saw."""
    out_dir = tmp_path_factory.mktemp("tiny")
    record = json.loads((DATA / "golden" / "record.json").read_text())
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            path = tiny_models.build(tiny_models.SPECS[name], out_dir / f"{name}-F32.gguf")
            expected = record["models"][f"{name}-F32"]["sha256"]
            assert tiny_models.sha256(path) == expected, (
                f"tests/fixtures/tiny_models.py no longer builds the {name} file the golden data was made from; "
                "run tools/make_golden.py again"
            )
            built[name] = path
        return built[name]

    return get


@pytest.fixture
def micro_gguf(tmp_path):
    def make(name: str = "micro.gguf", **kwargs) -> Path:
        return write_micro_gguf(tmp_path / name, **kwargs)

    return make
