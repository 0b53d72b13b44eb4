"""Completion: the one set of end-of-generation rules (Model.generate and the engine use it)."""

from __future__ import annotations

import numpy as np

from edgebox.text.generation import Completion
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
