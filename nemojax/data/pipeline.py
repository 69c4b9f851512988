"""The grain pipeline from `config.data` to batches: source -> shuffle -> repeat -> host shard -> batch.

Its iterator's state (`get_state` / `set_state`) is saved with every checkpoint, so a resumed run
reads exactly the batches an uninterrupted one would have, mid-epoch included.
"""

from __future__ import annotations

from typing import Callable

import grain
import jax
import ml_collections
import numpy as np

from nemojax.config import ConfigError, ModelConfig
from nemojax.data import posttrain
from nemojax.data.packing import PackedWindows
from nemojax.data.sources import DataError, TokenWindows, expand_paths, open_token_file, tokenize_text_files
from nemojax.data.synthetic import HELD_OUT_STREAM, SyntheticSource



def _eos(cfg: ModelConfig) -> int:
    eos = cfg.eos_token_id
    if isinstance(eos, (tuple, list)):
        eos = eos[0]
    if eos is None:
        raise DataError("config field `model.eos_token_id` is None: packing needs an end-of-document token")
    return int(eos)


def make_source(data: ml_collections.ConfigDict, cfg: ModelConfig, seq_len: int, seed: int):
    if data.source == "synthetic":
        if cfg.vocab_size < 256:
            raise DataError(f"data.source 'synthetic' is byte-level: needs vocab_size >= 256, "
                            f"model has {cfg.vocab_size}")
        return SyntheticSource(seed, seq_len)
    if data.source == "text":
        stream = tokenize_text_files(data.paths, data.tokenizer, data.text_field, cfg.vocab_size, _eos(cfg))
        return TokenWindows([stream], list(expand_paths(data.paths)), seq_len, _eos(cfg), cfg.vocab_size)
    if data.source == "tokens":
        paths = expand_paths(data.paths)
        return TokenWindows([open_token_file(p, data.tokens_dtype) for p in paths], paths, seq_len, _eos(cfg),
                            cfg.vocab_size)
    raise DataError(f"config field `data.source` = {data.source!r}: expected synthetic, text or tokens")


def with_segment_ids(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds `segment_ids`: the document each position belongs to, counted from the window's first
    (a new document starts wherever the loss mask drops a document's first token); one window or a batch."""
    return {**example, "segment_ids": np.cumsum(~example["mask"], axis=-1, dtype=np.int32) - 1}


def train_source(config: ml_collections.ConfigDict, cfg: ModelConfig, log: Callable[[str], None] = print):
    """The task's random-access source: token windows (pretraining) or packed chat windows (SFT, DPO;
    what packing did is logged)."""
    if config.task == "pretrain":
        return make_source(config.data, cfg, config.seq_len, config.data.shuffle_seed)
    arrays, stats = posttrain.windows(config, cfg)
    posttrain.describe(config, stats, log)
    return PackedWindows(arrays)


def batches(config: ml_collections.ConfigDict, source) -> grain.DatasetIterator:
    """Batches of {"tokens", "mask", ...} with this host's share of `config.batch_size` sequences;
    with `data.isolate_documents` also "segment_ids", which keep packed documents apart in the model
    (packed chat windows always carry them)."""
    dataset = grain.MapDataset.source(source)
    if config.data.isolate_documents and config.task == "pretrain":
        dataset = dataset.map(with_segment_ids)
    if not isinstance(source, SyntheticSource):  # synthetic sequences are already independent draws
        dataset = dataset.shuffle(seed=config.data.shuffle_seed).repeat()
    hosts, host = jax.process_count(), jax.process_index()
    if config.batch_size % hosts:
        raise ConfigError(f"config field `batch_size` = {config.batch_size}: must divide by {hosts} hosts")
    dataset = dataset[host::hosts].batch(config.batch_size // hosts, drop_remainder=True)
    return iter(dataset.to_iter_dataset())


def train_iterator(config: ml_collections.ConfigDict, cfg: ModelConfig, log: Callable[[str], None] = print
                   ) -> grain.DatasetIterator:
    return batches(config, train_source(config, cfg, log))


def eval_batches(config: ml_collections.ConfigDict, cfg: ModelConfig) -> list[dict[str, np.ndarray]]:
    """Held-out sequences (synthetic pretraining: with recall positions; SFT / DPO: generated conversations
    / pairs, `data.eval_sequences` of them), batched; empty for file sources."""
    if config.data.source != "synthetic" or not config.data.eval_sequences:
        return []
    if config.task != "pretrain":
        arrays, _ = posttrain.windows(config, cfg, held_out=True)
        size = min(config.batch_size, len(arrays["tokens"]))
        return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, len(arrays["tokens"]) - size + 1, size)]
    batches = synthetic_eval_batches(config.data.shuffle_seed, config.seq_len, config.data.eval_sequences,
                                     config.batch_size)
    if config.data.isolate_documents:
        batches = [with_segment_ids(b) for b in batches]
    return batches


def synthetic_eval_batches(shuffle_seed: int, seq_len: int, count: int, batch_size: int
                           ) -> list[dict[str, np.ndarray]]:
    """`count` sequences of the held-out stream of the synthetic run with this `shuffle_seed`, in whole
    batches of at most `batch_size`."""
    source = SyntheticSource(shuffle_seed + HELD_OUT_STREAM, seq_len)
    examples = [source[i] for i in range(count)]
    size = min(batch_size, len(examples))
    return [{k: np.stack([e[k] for e in examples[i:i + size]]) for k in examples[0]}
            for i in range(0, len(examples) - size + 1, size)]
