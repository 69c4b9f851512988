"""RULER-style tasks (`nemojax/ruler.py`): deterministic generators whose prompts hold what the question needs
within the length asked for, and the scoring rule on hand-made replies (eval.py's ruler task runs in
tests/test_eval.py)."""

from __future__ import annotations

import collections
import re

import pytest

from nemojax import ruler

BYTES = lambda text: len(text.encode())  # noqa: E731  (the byte tokenizer's token count)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_examples_are_deterministic_fit_the_length_and_hold_their_answers(task):
    examples = ruler.make_examples(task, 1024, 3, seed=0, count_tokens=BYTES)
    assert examples == ruler.make_examples(task, 1024, 3, seed=0, count_tokens=BYTES)
    assert examples != ruler.make_examples(task, 1024, 3, seed=1, count_tokens=BYTES)
    assert len({e.prompt for e in examples}) == 3
    for example in examples:
        assert 0.75 * 1024 <= BYTES(example.prompt) <= 1024, BYTES(example.prompt)
        assert example.prompt.endswith("Answer: ") and example.answers
        text = example.prompt.rsplit("\n", 1)[0]  # the haystack, without the question
        if task.startswith("niah"):
            assert all(f"is: {a}." in text for a in example.answers)
        elif task == "variable_tracking":  # a chain from the value through every answer
            value = re.search(r"assigned the value (\d+)", example.prompt).group(1)
            assert f"VAR {example.answers[0]} = {value}." in text
            assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(example.answers, example.answers[1:]))
        else:  # the answers are the most frequent words
            counts = collections.Counter(text.split())
            top = [w for w, _ in counts.most_common(len(example.answers))]
            assert sorted(top) == sorted(example.answers)
            assert counts.most_common()[len(top) - 1][1] > counts.most_common()[len(top)][1]


def test_niah_variants_ask_what_they_say():
    single, multikey, multivalue, multiquery = (ruler.make_examples(t, 512, 1, 0, BYTES)[0] for t in (
        "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"))
    assert len(single.answers) == 1 and len(multikey.answers) == 1
    assert multikey.prompt.count("special magic numbers for") == 4  # four keys in the text, one asked
    assert len(multivalue.answers) == 4 and len(multiquery.answers) == 2


def test_score_counts_whole_answers():
    assert ruler.score("The number is 1234567.", ["1234567"]) == 1.0
    assert ruler.score("1234567 and 7654321", ["1234567", "7654321"]) == 1.0
    assert ruler.score("only 7654321 here", ["1234567", "7654321"]) == 0.5
    assert ruler.score("12345678", ["1234567"]) == 0.0  # a longer number is not the answer
    assert ruler.score("VAR ABCDE-X", ["ABCDE"]) == 0.0
    assert ruler.score("", ["x"]) == 0.0


def test_lengths_parse_and_bad_ones_are_named():
    assert ruler.parse_lengths("4k,16k, 100") == [4096, 16384, 100]
    with pytest.raises(ValueError, match="'4q' is not a length"):
        ruler.parse_lengths("4k,4q")


def test_a_length_too_short_for_the_task_is_named():
    with pytest.raises(ValueError, match="niah_single: its shortest prompt takes .* more than the length 40"):
        ruler.make_examples("niah_single", 40, 1, 0, BYTES)
