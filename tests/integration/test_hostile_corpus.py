"""The hostile corpus (tests/data/hostile, written by tools/make_hostile_corpus.py) through the
command line: for every file, ``edgebox info FILE`` and ``edgebox run FILE -p hi -n 1`` end with
the exit code expected.json gives and, when they fail, exactly one error line holding its words
and no traceback.

Every file runs in-process through ``edgebox.cli.main`` (the console script's function, with its
argv, exit code and streams), because a Python start-up per file and command would take minutes;
a handful also run as real subprocesses. ``run`` uses one chip and the numpy reference kernels:
the faults are in the file, not in the kernels, and no numba compile or autotune is needed.
The engine case: a request whose logits are NaN ends with an error summary, the others are served.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgebox
from edgebox.cli import main as cli_main
from edgebox.engine import Engine, Request
from edgebox.text.sampler import SamplingParams
from tests.fixtures.paths import DATA
from tools import make_hostile_corpus

CORPUS = DATA / "hostile"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())
RUN = ["-p", "hi", "-n", "1", "--chips", "1", "--backend", "ref"]


def args_of(command: str, path: Path) -> list[str]:
    return [command, str(path), *(RUN if command == "run" else [])]


def check(path: Path, command: str, code: int, err: str) -> None:
    expected = EXPECTED[path.name][command]
    assert "Traceback" not in err, err
    assert code == expected["exit"], f"{command} {path.name}: exit {code}, stderr {err!r}"
    if code == 0:
        return
    # run shows its weight preparation (one line of \r updates) before generating; nothing else
    *before, last, end = err.split("\n")
    assert end == "" and all(line.startswith("\rpreparing weights") for line in before), err
    assert last.startswith("edgebox: error: "), err
    message = last.replace(str(path), "FILE").replace(path.name, "FILE")  # the words, not the file's name
    assert expected["error"] in message, f"{command} {path.name}: {last!r}"


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    saved = sys.argv
    sys.argv = ["edgebox", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            cli_main()
    finally:
        sys.argv = saved
    return exc.value.code, capsys.readouterr().err


def test_the_committed_corpus_is_what_the_tool_writes():
    built = make_hostile_corpus.build()
    assert len(built) >= 40
    assert sorted(built) == sorted(p.name for p in CORPUS.glob("*.gguf"))
    assert sorted(built) == sorted(EXPECTED)
    for name, (data, expected) in built.items():
        assert (CORPUS / name).read_bytes() == data, f"{name}: run python tools/make_hostile_corpus.py"
        assert EXPECTED[name] == expected
        assert len(data) < 20_000, name


@pytest.mark.parametrize("command", ["info", "run"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file(name, command, capsys):
    path = CORPUS / name
    code, err = run_in_process(args_of(command, path), capsys)
    check(path, command, code, err)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, command",
    [
        ("nano.gguf", "run"),
        ("nested-arrays-1000.gguf", "info"),
        ("freq-base-string.gguf", "run"),
        ("tokens-ints.gguf", "info"),
        ("tensor-type-99-unused.gguf", "info"),
        ("nan-output-weight.gguf", "run"),
    ],
)
def test_corpus_file_through_the_console_script(name, command):
    path = CORPUS / name
    proc = subprocess.run([sys.executable, "-m", "edgebox.cli", *args_of(command, path)], capture_output=True, timeout=120)
    check(path, command, proc.returncode, proc.stderr.decode())  # bytes: text mode would turn the \r into lines


def test_engine_ends_the_request_with_non_finite_logits_and_serves_the_others(tmp_path):
    """Token "ab" has a NaN embedding: the request that holds it ends with an error summary (one
    line); a request in the same step and one after it are served."""
    base = make_hostile_corpus.nano()
    embd = np.frombuffer(base.tensors[0].data, "<f4").reshape(len(make_hostile_corpus.TOKENS), -1).copy()
    embd[make_hostile_corpus.TOKENS.index("ab")] = np.nan
    path = tmp_path / "nan-ab.gguf"
    path.write_bytes(base.with_tensor("token_embd.weight", data=embd.tobytes()).to_bytes())
    greedy = SamplingParams(temperature=0.0)
    with Engine(edgebox.load(path, backend="ref"), max_batch=4, warmup=False) as engine:
        poisoned, fine = engine.submit_many(
            [Request(prompt="ab", max_tokens=4, params=greedy), Request(prompt="hi", max_tokens=1, params=greedy)]
        )
        bad, good = poisoned.result(30), fine.result(30)
        after = engine.generate(Request(prompt="hi", max_tokens=1, params=greedy))
    assert bad.done_reason == "error" and "\n" not in bad.error
    assert bad.error.startswith("the model produced non-finite logits (largest nan) at token 2;"), bad.error
    assert good.done_reason in ("stop", "length") and good.error is None
    assert after.done_reason in ("stop", "length") and after.error is None
