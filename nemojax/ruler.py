"""RULER-style long-context tasks (Hsieh et al., 2024), generated here (no download), deterministic by seed.

Each example is a haystack of filler text of about `length` tokens holding what the question needs:

    niah_single      one "special magic number" for a key; recall it
    niah_multikey    several keys, each with its number; recall one key's
    niah_multivalue  one key with several numbers; recall them all
    niah_multiquery  several keys; recall the numbers of several of them
    variable_tracking  chained assignments (VAR A = 12345, VAR B = VAR A, ...); name every variable that holds
                     the value
    common_words     a word list where a few words repeat far more often than the rest; name the most common
    frequent_words   a coded-word text (Zipf-like counts); name the three most frequent

Scoring is RULER's: the fraction of the expected answers that appear in the reply as whole words.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
         "common_words", "frequent_words")
_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
_WORDS = ("apple river stone cloud maple ember quartz meadow falcon harbor violet cedar lantern orchid prism "
          "willow copper thistle saffron glacier").split()


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # haystack, then the question; the reply should start with the answer
    answers: tuple[str, ...]


def _number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _key(rng: np.random.Generator) -> str:
    return "-".join(rng.choice(_WORDS, 2, replace=False))


def _haystack(needles: Sequence[str], fill: int, rng: np.random.Generator) -> str:
    """`fill` characters of filler with the needles at random sentence boundaries, in order."""
    repeats = fill // len(_FILLER)
    cuts = np.sort(rng.integers(0, repeats + 1, len(needles)))
    parts, start = [], 0
    for cut, needle in zip(cuts, needles):
        parts += [_FILLER * (cut - start), needle + " "]
        start = cut
    return "".join(parts) + _FILLER * (repeats - start)


def _niah(rng, fill: int, keys: int, values: int, queries: int, task: str) -> Example:
    names = []
    while len(names) < keys:
        name = _key(rng)
        if name not in names:
            names.append(name)
    numbers = {k: [_number(rng) for _ in range(values)] for k in names}
    needles = [f"One of the special magic numbers for {k} is: {v}." for k in names for v in numbers[k]]
    order = rng.permutation(len(needles))
    asked = [names[i] for i in rng.choice(keys, queries, replace=False)]
    question = (f"What are all the special magic numbers for {', '.join(asked)} mentioned in the text? "
                if values > 1 or queries > 1 else f"What is the special magic number for {asked[0]} mentioned "
                                                  "in the text? ")
    text = _haystack([needles[i] for i in order], fill, rng)
    return Example(task, f"{text}\n{question}Answer: ", tuple(v for k in asked for v in numbers[k]))


def _variable_tracking(rng, fill: int, task: str, chain: int = 4) -> Example:
    names = ["".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), 5)) for _ in range(chain)]
    value = _number(rng)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, chain)]
    text = _haystack(needles, fill, rng)
    question = f"Find all variables that are assigned the value {value} in the text above. "
    return Example(task, f"{text}\n{question}Answer: ", tuple(names))


def _common_words(rng, fill: int, task: str, common: int = 3) -> Example:
    """Rounds of the word list in which the `common` words come 4 times each and 9 others once."""
    vocabulary = [w + str(i) for i, w in enumerate(rng.permutation(_WORDS))]
    round_ = vocabulary[:common] * 4 + vocabulary[common:common + 9]
    rounds = max(1, fill // len(" ".join(round_)))
    words = list(rng.permutation(round_ * rounds))
    question = f"What are the {common} most common words in the list above? "
    return Example(task, " ".join(words) + f"\n{question}Answer: ", tuple(vocabulary[:common]))


def _frequent_words(rng, fill: int, task: str, top: int = 3) -> Example:
    """Coded words with Zipf-like counts (1 / rank^1.2) filling about `fill` characters."""
    coded = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for _ in range(20)]
    weights = 1 / np.arange(1, 21) ** 1.2
    counts = np.maximum(1, np.round(weights / weights.sum() * fill / 6)).astype(int)
    words = list(rng.permutation(np.repeat(coded, counts)))
    question = f"What are the {top} most frequently appeared coded words in the text above? "
    return Example(task, " ".join(words) + f"\n{question}Answer: ", tuple(coded[:top]))


_MAKERS: dict[str, Callable[..., Example]] = {
    "niah_single": lambda rng, fill, task: _niah(rng, fill, 1, 1, 1, task),
    "niah_multikey": lambda rng, fill, task: _niah(rng, fill, 4, 1, 1, task),
    "niah_multivalue": lambda rng, fill, task: _niah(rng, fill, 1, 4, 1, task),
    "niah_multiquery": lambda rng, fill, task: _niah(rng, fill, 4, 1, 2, task),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
}
assert tuple(_MAKERS) == TASKS


def make_examples(task: str, length: int, count: int, seed: int, count_tokens: Callable[[str], int]
                  ) -> list[Example]:
    """`count` examples of `task` whose prompts are at most `length` tokens (`count_tokens` measures one),
    the same for the same seed."""
    if task not in _MAKERS:
        raise ValueError(f"RULER task {task!r}: expected one of {', '.join(TASKS)}")
    examples = []
    for index in range(count):
        fill = 4 * length
        while True:  # shrink the filler until the prompt fits
            example = _MAKERS[task](np.random.default_rng((seed, TASKS.index(task), length, index)), fill, task)
            tokens = count_tokens(example.prompt)
            if tokens <= length:
                break
            if fill < 16:
                raise ValueError(f"RULER task {task}: its shortest prompt takes {tokens} tokens, more than the "
                                 f"length {length}")
            fill = int(fill * length / tokens * 0.97)
        examples.append(example)
    return examples


def score(reply: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` that appear in `reply` as whole words (RULER's string_match_all)."""
    return sum(bool(re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", reply)) for a in answers) / len(answers)


def parse_lengths(text: str) -> list[int]:
    """"4k,16k,64k" (k = 1024) or plain token counts -> [4096, 16384, 65536]."""
    lengths = []
    for item in text.split(","):
        item = item.strip().lower()
        match = re.fullmatch(r"(\d+)(k?)", item)
        if not match or int(match.group(1)) == 0:
            raise ValueError(f"--ruler_lengths: {item!r} is not a length such as 4k or 4096")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return lengths
