"""Generated chat data over the synthetic language, so SFT and DPO run on the CPU with no download.

A user asks a recall question (`a=7 q=3 m=9 | q=`) or a sum (`37+48=`); the assistant answers, after a
short `<think>` trace when reasoning is on (`<think>7+8=15 3+4+1=8</think>85`). DPO pairs prefer the
right answer to a wrong one. `TEMPLATE` is the byte-level chat template these conversations are
rendered with: Nemotron 3's conventions (an `enable_thinking` argument, `<think></think>` opening the
reply when it is off, thinking traces dropped from all but the last assistant turn) in plain bytes,
with a newline (the synthetic language's end-of-document token) ending each turn.
"""

from __future__ import annotations

import numpy as np

from nemojax.data.chat import Conversation, Pair
from nemojax.data.synthetic import _LETTERS, HELD_OUT_STREAM

TEMPLATE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- set final = loop.index0 == ns.last and not add_generation_prompt -%}"
    "{%- if '</think>' in content and not (final and enable_thinking) -%}"
    "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<a>' + ('<think></think>' if final and not enable_thinking else '') + content + '\n' -}}"
    "{%- else -%}{{- '<' + m.role[0] + '>' + m.content + '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<a>' + ('' if enable_thinking else '<think></think>') -}}{%- endif -%}"
)
END_OF_TURN = "\n"


def question(rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(user text, thinking trace, right answer, a wrong answer). The wrong answer is wrong in a way a
    small model can learn to see: a value the context never mentions, or a sum whose last digit
    disagrees with its own trace."""
    if rng.random() < 0.5:
        n_pairs = int(rng.integers(2, 5))
        keys = [chr(k) for k in rng.choice(_LETTERS, n_pairs, replace=False)]
        values = [int(v) for v in rng.integers(0, 10, n_pairs)]
        i = int(rng.integers(n_pairs))
        wrong = int(rng.choice([v for v in range(10) if v not in values]))
        text = " ".join(f"{k}={v}" for k, v in zip(keys, values)) + f" | {keys[i]}="
        return text, f"{keys[i]}={values[i]}", str(values[i]), str(wrong)
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    ones = a % 10 + b % 10
    trace = f"{a % 10}+{b % 10}={ones} {a // 10}+{b // 10}+{ones // 10}={a // 10 + b // 10 + ones // 10}"
    wrong = a + b - ones % 10 + (ones % 10 + int(rng.integers(1, 10))) % 10  # another last digit
    return f"{a}+{b}=", trace, str(a + b), str(wrong)


def _reply(answer: str, trace: str, thinking: bool) -> dict:
    return {"role": "assistant", "content": f"<think>{trace}</think>{answer}" if thinking else answer}


def conversation(seed: int, index: int) -> Conversation:
    """One or two question-answer turns, reasoning on or off (half each)."""
    rng = np.random.default_rng((seed, index))
    thinking = bool(rng.random() < 0.5)
    messages = []
    for _ in range(1 + int(rng.random() < 0.3)):
        text, trace, answer, _ = question(rng)
        messages += [{"role": "user", "content": text}, _reply(answer, trace, thinking)]
    return Conversation(tuple(messages), f"synthetic conversation {index}", thinking)


def pair(seed: int, index: int) -> Pair:
    """A question with its right answer chosen and a wrong one rejected, both after the same thinking
    trace (reasoning on: the wrong answer contradicts the trace)."""
    rng = np.random.default_rng((seed, index))
    thinking = True
    text, trace, answer, wrong = question(rng)
    prompt = Conversation(({"role": "user", "content": text},), f"synthetic pair {index}", thinking)
    return Pair(prompt, _reply(answer, trace, thinking), _reply(wrong, trace, thinking))


def held_out_questions(seed: int, count: int) -> list[tuple[str, str]]:
    """(user text, right answer) pairs from a stream no training run draws from."""
    rng = np.random.default_rng((seed, HELD_OUT_STREAM))
    return [question(rng)[::2] for _ in range(count)]
