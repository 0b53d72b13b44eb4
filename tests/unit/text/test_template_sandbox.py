"""Hostile chat templates: every one refused with one line within the time bound, the box unharmed.

The corpus is tests/data/chat_templates/hostile/ (expected.json: the fragment each error carries).
A render runs on a helper thread here so that a renderer without bounds fails the test instead of
hanging the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from edgebox.errors import EdgeboxError
from edgebox.text.chat import render_chat
from edgebox.text.template_sandbox import MAX_PROMPT_CHARS, RENDER_SECONDS, RENDERER, TemplateRenderer
from tests.fixtures.paths import DATA

TEMPLATES = DATA / "chat_templates"
HOSTILE = TEMPLATES / "hostile"
HOSTILE_EXPECTED = json.loads((HOSTILE / "expected.json").read_text(encoding="utf-8"))
EXPECTED = json.loads((TEMPLATES / "expected.json").read_text(encoding="utf-8"))
USER = [{"role": "user", "content": "hi"}]
# the bound plus starting a fresh worker (the previous case may have had its worker replaced) on a busy machine
REFUSE_SECONDS = RENDER_SECONDS + 4.0


def bounded(fn, seconds: float = REFUSE_SECONDS):
    """``fn()``'s result or exception; fails if it has not finished within ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed back to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds:.1f} s"
    box["seconds"] = time.perf_counter() - t0
    return box


def refused(template: str, messages=USER) -> str:
    box = bounded(lambda: render_chat(template, messages))
    assert "error" in box, f"rendered {len(box['value'])} characters"
    assert isinstance(box["error"], EdgeboxError), repr(box["error"])
    text = str(box["error"])
    assert "\n" not in text and len(text) < 500
    return text


def real_cases_render_as_recorded():
    for case in EXPECTED["cases"]:
        template = (TEMPLATES / case["template"]).read_text(encoding="utf-8")
        out = render_chat(template, EXPECTED["conversation"], bos_token=case["bos_token"], eos_token=case["eos_token"])
        assert out == case["expected"], case["template"]


def test_every_hostile_template_has_an_expected_error():
    assert sorted(HOSTILE_EXPECTED) == sorted(p.name for p in HOSTILE.glob("*.jinja"))


@pytest.mark.parametrize("name", sorted(HOSTILE_EXPECTED))
def test_hostile_template_is_refused_with_one_line_in_time(name):
    text = refused((HOSTILE / name).read_text(encoding="utf-8"))
    assert HOSTILE_EXPECTED[name] in text, text


def test_the_renderer_works_after_each_kind_of_breach():
    for name in ("loop-bomb.jinja", "string-multiplication-bomb.jinja", "output-bomb.jinja", "nested-ifs-150.jinja"):
        refused((HOSTILE / name).read_text(encoding="utf-8"))
        real_cases_render_as_recorded()


def test_a_bomb_hidden_behind_the_messages_is_stopped_at_render():
    # passes the load check (it renders a plain conversation) and bombs on one word
    tmpl = "{% for m in messages %}{% if m.content == 'boom' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat(tmpl, USER) == "hi"
    assert "ran longer than" in refused(tmpl, [{"role": "user", "content": "boom"}])


def test_output_just_under_the_limit_is_kept():
    n = MAX_PROMPT_CHARS - 10
    assert len(render_chat(f"{{{{ 'x' * {n} }}}}", USER)) == n
    assert "rendered more than" in refused(f"{{{{ 'x' * {MAX_PROMPT_CHARS + 1} }}}}")


def test_threads_render_concurrently_while_one_bombs():
    """The engine and the daemon render from several threads: every render keeps its own result."""
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(20):
                real_cases_render_as_recorded()
        except BaseException as e:  # noqa: B036
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    text = refused((HOSTILE / "loop-bomb.jinja").read_text(encoding="utf-8"), USER)
    for t in threads:
        t.join(60)
    assert not errors and "ran longer than" in text


def test_a_lone_surrogate_and_non_ascii_text_round_trip():
    content = "caf\u00e9 \U0001f600 \ud800 <\uff5cUser\uff5c>"
    assert render_chat("{{ messages[0].content }}", [{"role": "user", "content": content}]) == content


def test_extra_keys_that_are_not_json_values_are_one_line():
    text = refused("{{ messages }}", [{"role": "user", "content": "x", "tool": object()}])
    assert "not plain JSON values" in text


def test_a_worker_killed_between_renders_is_replaced():
    render_chat("{{ 1 }}", USER)
    RENDERER._proc.kill()
    RENDERER._proc.wait()
    real_cases_render_as_recorded()


def test_a_forked_child_renders_with_its_own_worker():
    render_chat("{{ 1 }}", USER)
    parent_worker = RENDERER._proc.pid
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        ok = False
        try:
            ok = render_chat("{{ messages[0].content }}", USER) == "hi" and RENDERER._proc.pid != parent_worker
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert RENDERER._proc.pid == parent_worker
    real_cases_render_as_recorded()


def test_smaller_limits_are_honoured():
    r = TemplateRenderer(seconds=0.2, memory_bytes=16 << 20, max_chars=100)
    try:
        assert r.render("{{ 'x' * 100 }}", {"messages": USER}) == ("ok", "x" * 100)
        assert r.render("{{ 'x' * 101 }}", {"messages": USER})[0] == "limit"
        assert "needed more than 16 MiB" in r.render("{{ ('x' * 30000000)|length }}", {})[1]
        t0 = time.perf_counter()
        assert "ran longer than 0.2 s" in r.render((HOSTILE / "loop-bomb.jinja").read_text(), {})[1]
        assert time.perf_counter() - t0 < 0.2 + 1.0
    finally:
        r.close()


_ORPHAN = """
import sys, os
from edgebox.text.template_sandbox import TemplateRenderer
r = TemplateRenderer(seconds=600)
r.render("{{ 1 }}", {})
print(r._proc.pid, flush=True)
r.render(open(sys.argv[1]).read(), {})
"""


@pytest.mark.slow
def test_a_worker_whose_parent_died_mid_bomb_ends_itself():
    """The CPU limit ends a looping worker even when no parent is left to kill it."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, str(HOSTILE / "loop-bomb.jinja")], stdout=subprocess.PIPE, text=True
    )
    worker = int(parent.stdout.readline())
    time.sleep(0.3)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
