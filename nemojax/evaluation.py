"""eval.py's tasks: perplexity, multiple choice, synthetic recall, generation. Each returns a dict of
numbers (or texts) ready to print and write as JSON."""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.data.pipeline import synthetic_eval_batches
from nemojax.data.sources import DataError, read_documents, utf8_lines
from nemojax.generate import generate
from nemojax.loss import eval_metrics, eval_sums, eval_totals
from nemojax.model import NemotronH
from nemojax.scoring import Scorer
from nemojax.tokenizer import Tokenizer


class EvalError(ValueError):
    """Unusable evaluation data: names the file and what is wrong."""


def prefix_token(cfg: ModelConfig) -> int:
    """The token that conditions a text's first token (lm-eval's "prefix token"): bos, else eos."""
    token = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    token = token[0] if isinstance(token, tuple) else token
    if token is None:
        raise EvalError("the model config has neither bos_token_id nor eos_token_id to start a text with")
    return int(token)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, split the way lm-eval-harness splits them: trailing spaces move
    from the context to the continuation, and the pair is tokenized together (merges across the seam
    count as continuation)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix], tokenizer.encode(continuation)
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return whole[:len(head)], whole[len(head):]


def perplexity(scorer: Scorer, tokenizer: Tokenizer, paths: Sequence[str], text_field: str = "text") -> dict:
    """Every token of every document scored once (rolling windows of the model's length)."""
    prefix = prefix_token(scorer.cfg)
    requests, documents = [], 0
    for path in paths:
        texts = [t for t in _read(path, text_field) if t]
        if not texts:
            raise EvalError(f"{path}: no documents (the file is empty)")
        for text in texts:
            requests += scorer.rolling_requests(tokenizer.encode(text), prefix)
            documents += 1
    nll = -sum(logprob for logprob, _ in scorer.score(requests))
    tokens = sum(n for _, n in requests)
    return {"documents": documents, "tokens": tokens, "mean_nll": nll / tokens, "perplexity": math.exp(nll / tokens)}


def read_choice_examples(path: str) -> list[dict]:
    """{"context": str, "choices": [str, ...], "label": int} per line."""
    examples = []
    for number, record in enumerate(_read_jsonl(path), 1):
        choices = record.get("choices") if isinstance(record, dict) else None
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
                and isinstance(record.get("context"), str) and isinstance(record.get("label"), int)
                and 0 <= record["label"] < len(choices)):
            raise EvalError(f"{path}: example {number}: expected {{\"context\": str, \"choices\": [str, ...], "
                            f"\"label\": an index into choices}}, got {json.dumps(record)[:200]}")
        examples.append(record)
    if not examples:
        raise EvalError(f"{path}: no examples (the file is empty)")
    return examples


def choice_loglikelihoods(scorer: Scorer, tokenizer: Tokenizer, examples: Sequence[dict]) -> list[list[float]]:
    """Summed log p(choice | context) for every choice of every example."""
    prefix = prefix_token(scorer.cfg)
    requests = [scorer.continuation_request(*encode_pair(tokenizer, e["context"], c, prefix))
                for e in examples for c in e["choices"]]
    scores = iter(scorer.score(requests))
    return [[next(scores)[0] for _ in e["choices"]] for e in examples]


def choice(scorer: Scorer, tokenizer: Tokenizer, path: str) -> dict:
    """lm-eval-harness's acc (summed log-likelihood) and acc_norm (divided by the choice's characters)."""
    examples = read_choice_examples(path)
    acc = acc_norm = 0
    for example, lls in zip(examples, choice_loglikelihoods(scorer, tokenizer, examples)):
        acc += _argmax(lls) == example["label"]
        acc_norm += _argmax([ll / max(len(c), 1) for ll, c in zip(lls, example["choices"])]) == example["label"]
    return {"examples": len(examples), "acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}


def recall(cfg: ModelConfig, params: Any, sequences: int, seq_len: int, shuffle_seed: int, batch_size: int
           ) -> dict:
    """Next-token loss and recall accuracy on held-out sequences of the synthetic default run."""
    if cfg.vocab_size < 256:
        raise EvalError(f"the recall task is byte-level: needs vocab_size >= 256, the model has {cfg.vocab_size}")
    step = jax.jit(functools.partial(eval_sums, NemotronH(cfg)))
    totals = eval_totals(step(params, {k: jnp.asarray(v) for k, v in batch.items()})
                         for batch in synthetic_eval_batches(shuffle_seed, seq_len, sequences, batch_size))
    metrics = eval_metrics(totals)
    return {"sequences": sequences, "loss": metrics["eval_loss"], "recall_accuracy": metrics["recall_accuracy"],
            "recalled_digits": int(totals["recall_count"])}


def generate_texts(cfg: ModelConfig, params: Any, tokenizer: Tokenizer, prompts: Sequence[str],
                   chat: bool | None, **options: Any) -> list[dict]:
    """Completions of text prompts, through the chat template when `chat` (None: when there is one)."""
    if chat is None:
        chat = tokenizer.chat_template is not None
    if chat and tokenizer.chat_template is None:
        raise EvalError(f"--chat: tokenizer {tokenizer.name} has no chat template")
    texts = [tokenizer.chat(p) if chat else p for p in prompts]
    if options.get("max_thinking_tokens") is not None:
        options["thinking"] = tokenizer.thinking_tokens()
        if options["thinking"] is None:
            raise EvalError(f"--max_thinking_tokens: tokenizer {tokenizer.name} has no <think> and </think> tokens")
    outputs = generate(cfg, params, [tokenizer.encode(t) for t in texts], **options)
    return [{"prompt": p, "completion": tokenizer.decode(o), "tokens": len(o)} for p, o in zip(prompts, outputs)]


def final_answer(reply: str) -> str:
    """A reply's answer: the text after its thinking trace (none when the thought never closes)."""
    if "</think>" in reply:
        return reply.rsplit("</think>", 1)[1].strip()
    return "" if "<think>" in reply else reply.strip()


def chat_accuracy(cfg: ModelConfig, params: Any, tokenizer: Tokenizer, questions: Sequence[tuple[str, str]],
                  max_new_tokens: int = 64) -> dict:
    """Greedy answers to one-turn (question, answer) chats through the chat template, with reasoning on and
    off: the fraction whose final answer is exactly right in each mode."""
    if tokenizer.chat_template is None:
        raise EvalError(f"task chat: tokenizer {tokenizer.name} has no chat template")
    results: dict = {"questions": len(questions)}
    for mode, thinking in (("thinking", True), ("no_thinking", False)):
        prompts = [tokenizer.encode(tokenizer.render([{"role": "user", "content": q}], True, thinking))
                   for q, _ in questions]
        replies = generate(cfg, params, prompts, max_new_tokens)
        right = [final_answer(tokenizer.decode(r)) == answer for r, (_, answer) in zip(replies, questions)]
        results[f"accuracy_{mode}"] = sum(right) / max(1, len(right))
    return results


def ruler(cfg: ModelConfig, params: Any, tokenizer: Tokenizer, lengths: Sequence[int], tasks: Sequence[str],
          samples: int, seed: int = 0, max_new_tokens: int = 48, prefill_chunk: int = 0) -> dict:
    """RULER-style tasks (`nemojax.ruler`) at each prompt length: greedy replies (up to the first newline)
    scored by the fraction of expected answers they contain; per length each task's mean and their average.
    `prefill_chunk`: read the long prompts that many tokens at a time (`nemojax.generate`)."""
    from nemojax import ruler as tasks_module

    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    results: dict = {"samples": samples}
    for length in lengths:
        scores = {}
        for task in tasks:
            try:
                examples = tasks_module.make_examples(task, length, samples, seed, count)
            except ValueError as e:
                raise EvalError(str(e)) from None
            replies = generate(cfg, params, [tokenizer.encode(e.prompt) for e in examples], max_new_tokens,
                               prefill_chunk=prefill_chunk)
            texts = [tokenizer.decode(r).split("\n")[0] for r in replies]
            scores[task] = float(np.mean([tasks_module.score(t, e.answers) for t, e in zip(texts, examples)]))
            results[f"{length}/{task}"] = scores[task]
        results[f"{length}/average"] = float(np.mean(list(scores.values())))
    return results


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _read(path: str, text_field: str) -> list[str]:
    if not os.path.isfile(path):
        raise EvalError(f"data file {path!r}: no such file")
    try:
        return read_documents(path, text_field)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise EvalError(f"data file {path!r}: no such file")
    records = []
    try:
        for number, line in utf8_lines(path):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    except DataError as e:
        raise EvalError(str(e)) from None
    return records
