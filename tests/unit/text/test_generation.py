"""Completion: the one set of end-of-generation rules (Model.generate and the engine use it), and
StopMatcher (streaming stop strings)."""

from __future__ import annotations

import numpy as np
import pytest

from edgebox.text.generation import Completion, StopMatcher
from edgebox.text.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
EOG = 0


class LetterTokenizer:
    """Token i is the letter chr(ord('a') + i - 1); token 0 ends the generation; token 27 is half
    of a two-byte character (its text comes with the next token, or is lost at a flush)."""

    eog_ids = frozenset({EOG})

    def stream_decoder(self):
        return _Decoder()


class _Decoder:
    def __init__(self):
        self.held = ""

    def feed(self, token: int) -> str:
        if token == 27:
            self.held = "é"
            return ""
        text, self.held = self.held + chr(ord("a") + token - 1), ""
        return text

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def run(tokens, max_tokens=100, stop=()):
    c = Completion(LetterTokenizer(), [1, 2], GREEDY, max_tokens, stop)
    shown = []
    for t in tokens:
        shown.append(c.push(t))
        if c.done_reason:
            break
    shown.append(c.finish())
    return "".join(shown), c


def test_end_of_generation_stops_and_is_not_output():
    text, c = run([1, 2, EOG, 3])
    assert text == "ab" and c.done_reason == "stop" and c.tokens == [1, 2]


def test_max_tokens_ends_with_length_and_flushes_the_detokenizer():
    text, c = run([1, 2, 27], max_tokens=3)
    assert c.done_reason == "length" and text == "abé" and c.tokens == [1, 2, 27]


def test_a_stop_string_is_not_shown_and_wins_over_length():
    text, c = run([1, 2, 3, 4], max_tokens=3, stop=("bc",))
    assert c.done_reason == "stop" and text == "a" and c.stops.matched == "bc"


def test_a_partial_stop_string_is_released_at_the_end():
    # "c" could begin "cd": held back, then shown when the generation ends without it
    text, c = run([1, 3, EOG], stop=("cd",))
    assert (text, c.done_reason) == ("ac", "stop")
    text, c = run([1, 3], max_tokens=2, stop=("cd",))
    assert (text, c.done_reason) == ("ac", "length")


def test_the_caller_ends_it_at_a_full_context():
    c = Completion(LetterTokenizer(), [1], GREEDY, 100)
    assert c.push(27) == "" and c.done_reason is None
    assert c.finish("length") == "é" and c.done_reason == "length"


def test_the_sampler_sees_prompt_and_generated_tokens():
    # a repeat penalty on everything seen: greedy then avoids the prompt's token and its own
    c = Completion(LetterTokenizer(), [1], SamplingParams(temperature=0.0, repeat_penalty=100.0), 100)
    logits = np.array([-9, 5, 4, 3], np.float32)
    assert c.sample(logits) == 2
    c.push(2)
    assert c.sample(logits) == 3 and c.history == [1, 2]


# --- StopMatcher ----------------------------------------------------------------------------------


def run_stops(stops, pieces) -> tuple[str, bool]:
    """Everything a client would see, and whether the stream stopped."""
    m = StopMatcher(stops)
    shown = ""
    for piece in pieces:
        emit, stopped = m.push(piece)
        shown += emit
        if stopped:
            return shown, True
    return shown + m.flush(), False


def test_stop_string_split_across_pushes_is_held_back_and_dropped():
    m = StopMatcher(["</s>"])
    assert m.push("Hello <") == ("Hello ", False)
    assert m.push("/") == ("", False)
    assert m.push("s") == ("", False)
    assert m.push("> more") == ("", True)
    assert m.matched == "</s>" and m.stopped
    assert m.push("later") == ("", True) and m.flush() == ""


def test_a_false_start_is_released_as_soon_as_it_cannot_be_a_stop():
    m = StopMatcher(["</s>"])
    assert m.push("a <") == ("a ", False)
    assert m.push("b") == ("<b", False)
    assert m.push("plain") == ("plain", False)  # nothing held when no suffix can start a stop


def test_multiple_stops_first_one_to_complete_wins():
    assert run_stops(["User:", "\n\n"], ["Answer.", "\n", "\nUser: hi"]) == ("Answer.", True)
    assert run_stops(["User:", "\n\n"], ["Answer. User", ":"]) == ("Answer. ", True)
    # "bc" completes before "abcd" could: a char-by-char stream would stop there too
    assert run_stops(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run_stops(["abcd", "bc"], list("abcd")) == ("a", True)


def test_result_does_not_depend_on_how_the_text_is_split():
    text = "The answer is 42.<|EOT|>### Instruction: more"
    stops = ["### Instruction", "<|EOT|>", "42!"]
    whole = run_stops(stops, [text])
    assert whole == ("The answer is 42.", True)
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=rng.integers(1, 12), replace=False).tolist())
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert run_stops(stops, pieces) == whole


def test_no_false_holdback_at_the_end():
    m = StopMatcher(["</s>", "\nUser:"])
    assert m.push("ends with a partial </") == ("ends with a partial ", False)
    assert m.push("\nUs") == ("</", False)  # "</" is released; "\nUs" may still become "\nUser:"
    assert m.flush() == "\nUs"  # the stream ended: the held-back text is shown, nothing lost
    assert m.flush() == ""


def test_stop_at_the_very_start_and_no_stops_at_all():
    assert StopMatcher(["</s>"]).push("</s>tail") == ("", True)
    m = StopMatcher([])
    assert m.push("anything </s>") == ("anything </s>", False) and m.flush() == ""


def test_a_single_string_is_one_stop_and_empty_stops_are_refused():
    assert run_stops("END", ["the EN", "D"]) == ("the ", True)
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
