"""Chat data for SFT and DPO: jsonl conversations and preference pairs, rendered with the tokenizer's chat
template (the jinja2 path eval.py uses) and tokenized with a loss mask on the assistant's tokens.

Where the assistant's tokens are is read from the template itself, so any released template works
without `{% generation %}` markers: each assistant message is rendered once more with its content
replaced by a sentinel; the text that differs is what the template made of that content (stripped,
its thinking trace kept or dropped as the template does), and the turn runs on to the end-of-turn
text after it (`<|im_end|>`, `<SPECIAL_12>`, ...), so tool calls and the turn's end are learned too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from nemojax.data.sources import DataError, expand_paths, jsonl_records
from nemojax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
_SENTINEL = "\ue000\ue001\ue002"  # private-use characters: no template transforms them, no text holds them


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One jsonl line: its messages (roles checked), tools, `enable_thinking`, and where it came from."""

    messages: tuple[dict, ...]
    where: str  # "file:line", for errors
    enable_thinking: bool | None = None  # None: the config's default
    tools: tuple[dict, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Pair:
    """A preference pair: the prompt's messages and the chosen and rejected assistant replies."""

    prompt: Conversation
    chosen: dict
    rejected: dict


def _messages(value: Any, where: str, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: {field}[{i}] must be an object with a `role`")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has unknown role {message['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
        if content is None and not message.get("tool_calls"):
            raise DataError(f"{where}: {field}[{i}] has neither `content` nor `tool_calls`")
    return tuple(value)


def _conversation(record: dict, where: str, messages: Any) -> Conversation:
    messages = _messages(messages, where, "messages" if "messages" in record else "prompt")
    if "system" in record:
        if not isinstance(record["system"], str):
            raise DataError(f"{where}: field 'system' must be a string")
        messages = ({"role": "system", "content": record["system"]},) + messages
    thinking = record.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise DataError(f"{where}: field 'enable_thinking' must be true or false")
    tools = record.get("tools")
    return Conversation(messages, where, thinking, tuple(tools) if tools else None)


def _records(path: str):
    """(file:line, object) for every non-empty line of a jsonl file."""
    for where, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        yield where, record


def read_conversations(paths: Sequence[str] | str) -> list[Conversation]:
    """SFT data: lines of {"messages": [{"role", "content", "tool_calls"?}, ...], "system"?,
    "enable_thinking"?, "tools"?}; each needs an assistant turn to learn from."""
    conversations = []
    for path in expand_paths(paths):
        for where, record in _records(path):
            if "messages" not in record:
                raise DataError(f"{where}: expected a `messages` field")
            conversation = _conversation(record, where, record["messages"])
            if not any(m["role"] == "assistant" for m in conversation.messages):
                raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
            conversations.append(conversation)
    return conversations


def _reply(value: Any, where: str, field: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        return value
    raise DataError(f"{where}: field {field!r} must be a string or an assistant message")


def read_pairs(paths: Sequence[str] | str) -> list[Pair]:
    """DPO data: lines of {"prompt": str | "messages": [...], "chosen": str | message, "rejected": ...}."""
    pairs = []
    for path in expand_paths(paths):
        for where, record in _records(path):
            for field in ("chosen", "rejected"):
                if field not in record:
                    raise DataError(f"{where}: a preference pair needs a {field!r} field")
            if isinstance(record.get("prompt"), str):
                prompt = [{"role": "user", "content": record["prompt"]}]
            elif "messages" in record or "prompt" in record:
                prompt = record.get("messages", record.get("prompt"))
            else:
                raise DataError(f"{where}: a preference pair needs a `prompt` (string) or `messages` field")
            conversation = _conversation(record, where, prompt)
            pairs.append(Pair(conversation, _reply(record["chosen"], where, "chosen"),
                              _reply(record["rejected"], where, "rejected")))
    return pairs


@dataclasses.dataclass(frozen=True)
class ChatEncoder:
    """Renders conversations with `tokenizer`'s chat template and marks the assistant's tokens.

    `turns`: "all" (every assistant turn carries loss) or "last"; `end_of_turn`: the text that closes an
    assistant turn (default: the tokenizer config's eos_token, else none); `enable_thinking`: the
    default for conversations that do not set it (Nemotron 3's template argument; Nano 2's templates read
    `/think` and `/no_think` from the system message instead).
    """

    tokenizer: Tokenizer
    turns: str = "all"
    enable_thinking: bool = True
    end_of_turn: str | None = None

    def __post_init__(self):
        if self.tokenizer.chat_template is None:
            raise DataError(f"tokenizer {self.tokenizer.name} has no chat template (tokenizer_config.json "
                            "`chat_template` or chat_template.jinja): set config field `data.chat_template`")
        if self.turns not in ("all", "last"):
            raise DataError(f"config field `sft.turns` = {self.turns!r}: expected 'all' or 'last'")

    def _render(self, conversation: Conversation, messages: Sequence[dict], generation_prompt: bool = False) -> str:
        thinking = self.enable_thinking if conversation.enable_thinking is None else conversation.enable_thinking
        try:
            return self.tokenizer.render(list(messages), add_generation_prompt=generation_prompt,
                                         enable_thinking=thinking, tools=conversation.tools)
        except Exception as e:  # noqa: BLE001 - a template error is the data's or the template's: name both
            raise DataError(f"{conversation.where}: the chat template of {self.tokenizer.name} failed on this "
                            f"conversation ({type(e).__name__}: {e})") from None

    def _turn_end(self) -> str | None:
        return self.end_of_turn if self.end_of_turn is not None else self.tokenizer.special.get("eos_token")

    def spans(self, conversation: Conversation, messages: Sequence[dict] | None = None
              ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character spans of the assistant turns that carry loss."""
        messages = list(conversation.messages if messages is None else messages)
        text = self._render(conversation, messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.turns == "last":
            turns = turns[-1:]
        spans, end_text = [], self._turn_end()
        for i in turns:
            marked = self._render(conversation, [dict(m, content=_SENTINEL) if j == i else m
                                                 for j, m in enumerate(messages)])
            start = _common_prefix(text, marked)
            tail = _common_prefix(text[start:][::-1], marked[start:][::-1])
            end = len(text) - tail
            if marked[start:len(marked) - tail] != _SENTINEL:
                raise DataError(f"{conversation.where}: the chat template of {self.tokenizer.name} does not render "
                                f"assistant message {i}'s content in one piece; the loss mask cannot find it")
            if end_text:
                close = text.find(end_text, end)
                if close >= 0:
                    end = close + len(end_text)
            spans.append((start, end))
        return text, spans

    def encode(self, conversation: Conversation, messages: Sequence[dict] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, whether each token is a target: it lies in an assistant turn that carries loss)."""
        text, spans = self.spans(conversation, messages)
        ids, starts = self.tokenizer.encode_with_offsets(text)
        mask = np.zeros(len(ids), bool)
        for start, end in spans:
            mask |= (starts >= start) & (starts < end)
        return np.asarray(ids, np.int32), mask

    def prompt(self, conversation: Conversation) -> str:
        """The text the model continues: the conversation with the template's generation prompt."""
        return self._render(conversation, conversation.messages, generation_prompt=True)

    def encode_pair(self, pair: Pair) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """(chosen ids, mask), (rejected ids, mask): the prompt with each reply, loss on the reply only."""
        last = dataclasses.replace(self, turns="last")
        return tuple(last.encode(pair.prompt, list(pair.prompt.messages) + [reply])
                     for reply in (pair.chosen, pair.rejected))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chat_encoder(tokenizer: Tokenizer, sft: Any, chat_template: str = "") -> ChatEncoder:
    """The config's encoder: `data.chat_template` (a .jinja file) replaces the tokenizer's template."""
    if chat_template:
        if not os.path.isfile(chat_template):
            raise DataError(f"config field `data.chat_template` = {chat_template!r}: no such file")
        with open(chat_template) as f:
            tokenizer = tokenizer.with_template(f.read())
    return ChatEncoder(tokenizer, sft.turns, sft.enable_thinking, sft.end_of_turn or None)
