"""SFT and DPO data: conversations or preference pairs (jsonl files, or generated) rendered with the chat
template, masked to the assistant's tokens and packed into windows with segment ids."""

from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from nemojax.config import ModelConfig
from nemojax.data import synthetic_chat
from nemojax.data.chat import ChatEncoder, chat_encoder, read_conversations, read_pairs
from nemojax.data.packing import PackStats, pack
from nemojax.data.sources import DataError, load_tokenizer
from nemojax.data.synthetic import HELD_OUT_STREAM
from nemojax.tokenizer import Tokenizer

TASKS = ("pretrain", "sft", "dpo")


def chat_tokenizer(config: ml_collections.ConfigDict, cfg: ModelConfig) -> Tokenizer:
    """Generated data: bytes with the synthetic chat template; files: `data.tokenizer` and its template,
    else init_from's."""
    from nemojax.tokenizer import from_file

    if config.data.source == "synthetic":
        if cfg.vocab_size < 256:
            raise DataError(f"data.source 'synthetic' is byte-level: needs vocab_size >= 256, "
                            f"model has {cfg.vocab_size}")
        return Tokenizer().with_template(synthetic_chat.TEMPLATE)
    if config.data.tokenizer:
        load_tokenizer(config.data.tokenizer, cfg.vocab_size)  # the vocabulary check, with the data error
        return from_file(config.data.tokenizer)
    if config.init_from:  # the starting checkpoint's own tokenizer and chat template
        from nemojax.checkpoint.orbax_io import latest_checkpoint
        from nemojax.tokenizer import TokenizerError, for_checkpoint

        try:
            tokenizer = for_checkpoint(latest_checkpoint(config.init_from), None, None)
        except TokenizerError as e:
            raise DataError(f"{e} (or set config field `data.tokenizer`)") from None
        if tokenizer.vocab_size > cfg.vocab_size:
            raise DataError(f"tokenizer {tokenizer.name}: vocabulary of {tokenizer.vocab_size} tokens exceeds the "
                            f"model's vocab_size {cfg.vocab_size}")
        return tokenizer
    raise DataError(f"config field `data.tokenizer` is empty and there is no `init_from`: task {config.task!r} "
                    "on files needs a tokenizer.json (a checkpoint directory holding one works too)")


def encoder(config: ml_collections.ConfigDict, cfg: ModelConfig) -> ChatEncoder:
    chat = config.chat
    if config.data.source == "synthetic" and not chat.end_of_turn:
        chat = ml_collections.ConfigDict({**chat.to_dict(), "end_of_turn": synthetic_chat.END_OF_TURN})
    return chat_encoder(chat_tokenizer(config, cfg), chat, config.data.chat_template)


def windows(config: ml_collections.ConfigDict, cfg: ModelConfig, held_out: bool = False
            ) -> tuple[dict[str, np.ndarray], PackStats]:
    """Packed {"tokens", "mask", "segment_ids"} windows of the task's data (generated: `held_out` draws
    from the held-out stream), in an order shuffled by `data.shuffle_seed`."""
    data = config.data
    if data.source not in ("synthetic", "chat"):
        raise DataError(f"config field `data.source` = {data.source!r}: task {config.task!r} reads 'synthetic' "
                        "(generated) or 'chat' (jsonl files) data")
    chat = encoder(config, cfg)
    seed = data.shuffle_seed + (HELD_OUT_STREAM if held_out else 0)
    count = data.eval_sequences if held_out else data.synthetic_examples
    if config.task == "sft":
        conversations = ([synthetic_chat.conversation(seed, i) for i in range(count)]
                         if data.source == "synthetic" else read_conversations(data.paths))
        units = [[chat.encode(c)] for c in conversations]
    elif config.task == "dpo":
        pairs = ([synthetic_chat.pair(seed, i) for i in range(count)]
                 if data.source == "synthetic" else read_pairs(data.paths))
        units = [list(chat.encode_pair(p)) for p in pairs]
    else:
        raise DataError(f"config field `task` = {config.task!r}: expected one of {', '.join(TASKS)}")
    order = np.random.default_rng(data.shuffle_seed).permutation(len(units))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return pack([units[i] for i in order], config.seq_len, pad, data.overlong)


def describe(config: ml_collections.ConfigDict, stats: PackStats, log: Callable[[str], None]) -> None:
    log(stats.describe("conversations" if config.task == "sft" else "preference pairs"))
