"""Text <-> token ids for evaluation and generation: a checkpoint's tokenizer.json, or raw bytes.

`bytes` is the tokenizer of the synthetic default run (token id = byte value). A chat template (from
tokenizer_config.json or chat_template.jinja next to tokenizer.json) is rendered with jinja2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence


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

    def chat(self, user_message: str, enable_thinking: bool = True) -> str:
        """The text of a one-turn conversation ready for the assistant's reply."""
        import jinja2

        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                               enable_thinking=enable_thinking, **self.special)

    def thinking_tokens(self) -> ThinkingTokens | None:
        """<think> / </think> ids and every token whose text holds a newline, if the vocabulary has them."""
        start, end = self.token_id("<think>"), self.token_id("</think>")
        if start is None or end is None:
            return None
        newlines = tuple(i for i in range(self.vocab_size) if "\n" in self.decode([i]))
        return ThinkingTokens(start, end, newlines)


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
        return Tokenizer()
    if data.get("tokenizer"):
        return from_file(data["tokenizer"])
    raise TokenizerError(f"checkpoint {checkpoint!r} has no tokenizer (looked for {', '.join(tried)} and a "
                         "training config naming one): pass --tokenizer=PATH/tokenizer.json or --tokenizer=bytes")
