"""Text <-> token ids for evaluation and generation: a checkpoint's tokenizer.json, or raw bytes.

`bytes` is the tokenizer of the synthetic default run (token id = byte value). A chat template (from
tokenizer_config.json or chat_template.jinja next to tokenizer.json) is rendered with jinja2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ThinkingTokens:
    """Token ids that delimit a thought, and every id whose text contains a newline (from a tokenizer:
    `Tokenizer.thinking_tokens`). Nemotron 3 Nano / Super use <think> = 12, </think> = 13."""

    start: int
    end: int
    newlines: tuple[int, ...]


BYTES = "bytes"


class TokenizerError(ValueError):
    """No usable tokenizer: names where it looked."""


class Tokenizer:
    """encode / decode text; `chat` applies the chat template when there is one."""

    def __init__(self, hf=None, chat_template: str | None = None, special: dict[str, str] | None = None,
                 name: str = BYTES):
        self.hf, self.chat_template, self.special, self.name = hf, chat_template, special or {}, name

    @property
    def vocab_size(self) -> int:
        return 256 if self.hf is None else self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is None:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return (ord(text) if len(text) == 1 and ord(text) < 256 else None) if self.hf is None \
            else self.hf.token_to_id(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids and the character offset in `text` where each token starts."""
        if self.hf is None:
            ids = list(text.encode("utf-8"))
            char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
            return ids, char_of_byte.astype(np.int64)
        encoding = self.hf.encode(text, add_special_tokens=False)
        return encoding.ids, np.asarray([start for start, _ in encoding.offsets], np.int64).reshape(-1)

    def with_template(self, chat_template: str) -> "Tokenizer":
        return Tokenizer(self.hf, chat_template, self.special, self.name)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool, enable_thinking: bool = True,
               **extra) -> str:
        """The chat template applied (jinja2, as transformers does it): the one rendering path for
        generation prompts, SFT conversations and DPO pairs."""
        return _compiled(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
            **{**self.special, **{k: v for k, v in extra.items() if v is not None}})

    def chat(self, user_message: str, enable_thinking: bool = True) -> str:
        """The text of a one-turn conversation ready for the assistant's reply."""
        return self.render([{"role": "user", "content": user_message}], True, enable_thinking)

    def thinking_tokens(self) -> ThinkingTokens | None:
        """<think> / </think> ids and every token whose text holds a newline, if the vocabulary has them."""
        start, end = self.token_id("<think>"), self.token_id("</think>")
        if start is None or end is None:
            return None
        newlines = tuple(i for i in range(self.vocab_size) if "\n" in self.decode([i]))
        return ThinkingTokens(start, end, newlines)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """A chat template compiled once, in transformers' sandboxed environment (trim_blocks, lstrip_blocks,
    `tojson` without HTML escaping, `raise_exception`)."""
    import jinja2
    import jinja2.sandbox

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def from_file(path: str) -> Tokenizer:
    """A tokenizer.json (or a directory holding one), with its chat template when the directory has one."""
    from tokenizers import Tokenizer as HFTokenizer

    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise TokenizerError(f"tokenizer {file!r}: no such file")
    template, special = None, {}
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
        template = config.get("chat_template")
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            template = f.read()
    return Tokenizer(HFTokenizer.from_file(file), template if isinstance(template, str) else None, special, file)


def for_checkpoint(checkpoint: str, override: str | None, training_config: dict | None) -> Tokenizer:
    """`override` (a tokenizer.json path or "bytes"); else the checkpoint's own tokenizer.json (HF layout,
    or assets/ of a converted Orbax checkpoint); else the tokenizer its training config names."""
    if override:
        return Tokenizer() if override == BYTES else from_file(override)
    tried = []
    for directory in (checkpoint, os.path.join(checkpoint, "assets")):
        file = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(file):
            return from_file(directory)
        tried.append(file)
    data = (training_config or {}).get("data", {})
    if data.get("source") == "synthetic":
        if (training_config or {}).get("task") in ("sft", "dpo"):  # trained on the generated chats
            from nemojax.data.synthetic_chat import TEMPLATE

            return Tokenizer().with_template(TEMPLATE)
        return Tokenizer()
    if data.get("tokenizer"):
        return from_file(data["tokenizer"])
    raise TokenizerError(f"checkpoint {checkpoint!r} has no tokenizer (looked for {', '.join(tried)} and a "
                         "training config naming one): pass --tokenizer=PATH/tokenizer.json or --tokenizer=bytes")
