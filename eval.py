"""Evaluate or sample from a checkpoint (Orbax, from training or the converter, or a Hugging Face directory).

    python eval.py --checkpoint CKPT --tasks perplexity --data docs.jsonl
    python eval.py --checkpoint CKPT --tasks choice --choice_data choices.jsonl   # {context, choices, label}
    python eval.py --checkpoint WORKDIR/checkpoints/600 --tasks recall
    python eval.py --checkpoint SFT_WORKDIR --tasks chat   # held-out generated questions, reasoning on and off
    python eval.py --checkpoint CKPT --tasks generate --prompt "2+2=" [--nochat] [--max_thinking_tokens=512]
    python eval.py --checkpoint CKPT --tasks ruler --ruler_lengths 4k,16k,64k [--ruler_samples 20]

Results are printed as a table, and written as JSON to --output when it is given.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags, logging

TASKS = ("perplexity", "choice", "recall", "generate", "chat", "ruler")

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "an Orbax checkpoint directory or an HF checkpoint directory")
_TASKS = flags.DEFINE_list("tasks", None, f"comma-separated, from {', '.join(TASKS)}")
_DATA = flags.DEFINE_list("data", [], "perplexity: .jsonl files (a `text` field per line) or text files")
_CHOICE_DATA = flags.DEFINE_string("choice_data", None, "choice: a .jsonl of {context, choices, label} lines")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "the jsonl field holding a document's text (perplexity)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a prompt (repeat the flag for several)")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "generate: a file with one prompt per line")
_CHAT = flags.DEFINE_bool("chat", None, "generate: wrap each prompt in the tokenizer's chat template "
                          "(default: when the tokenizer has one; --nochat for raw prompts)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: sample among the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed")
_THINKING = flags.DEFINE_integer("max_thinking_tokens", None, "generate: reasoning budget (models with <think>)")
_SPECULATIVE = flags.DEFINE_integer("speculative_tokens", 0, "generate: draft this many tokens per backbone call "
                                    "with the model's MTP layers (same tokens greedily, same distribution sampled)")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 0, "generate, ruler: read prompts this many tokens at a time "
                                     "(bounds the prefill's memory on long prompts; 0: whole prompts)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "a tokenizer.json, or `bytes`; default: the checkpoint's")
_BATCH = flags.DEFINE_integer("batch_size", 8, "sequences per forward pass when scoring")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "scoring window (default: max_position_embeddings)")
_DTYPE = flags.DEFINE_string("dtype", None, "parameter and compute dtype (default: the checkpoint's)")
_SSM_IMPL = flags.DEFINE_string("ssm_impl", "auto", "the chunked SSD scan: xla, pallas (the fused kernels), or "
                                 "auto (pallas on GPU/TPU, xla on the CPU)")
_ATTENTION_IMPL = flags.DEFINE_string("attention_impl", "auto", "attention: xla, cudnn (GPU), splash (TPU), or auto "
                                      "(the backend's kernel, xla on the CPU)")
_CHAT_QUESTIONS = flags.DEFINE_integer("chat_questions", 64, "chat: held-out generated questions to answer")
_RECALL_SEQS = flags.DEFINE_integer("recall_sequences", 64, "recall: held-out sequences to score")
_RECALL_LEN = flags.DEFINE_integer("recall_seq_len", None, "recall: sequence length (default: the training run's)")
_RULER_LENGTHS = flags.DEFINE_string("ruler_lengths", "4k", "ruler: prompt lengths in tokens, e.g. 4k,16k,64k")
_RULER_TASKS = flags.DEFINE_list("ruler_tasks", None, "ruler: a subset of nemojax.ruler.TASKS (default: all)")
_RULER_SAMPLES = flags.DEFINE_integer("ruler_samples", 20, "ruler: examples per task and length")
_OUTPUT = flags.DEFINE_string("output", None, "where the results are written as JSON (default: printed only)")
flags.mark_flags_as_required(["checkpoint", "tasks"])
# Checked before the model loads, so a bad option costs no time. The library checks the same rules
# (nemojax.scoring.Scorer, nemojax.generate.check_sampling) for API and lm-eval users.
for _flag, _rule, _why in (
        ("batch_size", lambda v: v >= 1, "must be >= 1"),
        ("max_length", lambda v: v is None or v >= 2, "must be >= 2 (a context token and the token it scores)"),
        ("max_new_tokens", lambda v: v >= 1, "must be >= 1"),
        ("temperature", lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
        ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
        ("top_k", lambda v: v >= 0, "must be >= 0 (0 keeps every token)"),
        ("recall_sequences", lambda v: v >= 1, "must be >= 1"),
        ("chat_questions", lambda v: v >= 1, "must be >= 1"),
        ("ruler_samples", lambda v: v >= 1, "must be >= 1"),
        ("prefill_chunk", lambda v: v >= 0, "must be >= 0 (0: whole prompts)"),
        ("recall_seq_len", lambda v: v is None or v >= 2, "must be >= 2")):
    flags.register_validator(_flag, _rule, message=f"--{_flag} {_why}")


def run_tasks() -> dict:
    from nemojax import evaluation
    from nemojax.checkpoint.loading import load_model
    from nemojax.scoring import Scorer
    from nemojax.tokenizer import for_checkpoint

    unknown = [t for t in _TASKS.value if t not in TASKS]
    if unknown:
        raise evaluation.EvalError(f"--tasks: unknown task(s) {unknown}; expected some of {', '.join(TASKS)}")
    runtime = {"param_dtype": _DTYPE.value, "dtype": _DTYPE.value} if _DTYPE.value else {}
    runtime.update(ssm_impl=_SSM_IMPL.value, attention_impl=_ATTENTION_IMPL.value)
    cfg, params, training = load_model(_CHECKPOINT.value, **runtime)
    needs_text = {"perplexity", "choice", "generate", "chat", "ruler"} & set(_TASKS.value)
    tokenizer = for_checkpoint(_CHECKPOINT.value, _TOKENIZER.value, training) if needs_text else None
    scorer = Scorer(cfg, params, _BATCH.value, _MAX_LENGTH.value)
    results: dict = {"checkpoint": os.path.abspath(_CHECKPOINT.value)}
    for task in _TASKS.value:
        if task == "perplexity":
            if not _DATA.value:
                raise evaluation.EvalError("task perplexity: name the data file(s) with --data")
            results[task] = evaluation.perplexity(scorer, tokenizer, _DATA.value, _TEXT_FIELD.value)
        elif task == "choice":
            if not _CHOICE_DATA.value:
                raise evaluation.EvalError("task choice: name the examples file with --choice_data")
            results[task] = evaluation.choice(scorer, tokenizer, _CHOICE_DATA.value)
        elif task == "recall":
            data = (training or {}).get("data", {})
            seq_len = _RECALL_LEN.value or (training or {}).get("seq_len", 128)
            results[task] = evaluation.recall(cfg, params, _RECALL_SEQS.value, seq_len, data.get("shuffle_seed", 0),
                                              _BATCH.value)
        elif task == "ruler":
            from nemojax import ruler

            try:
                lengths = ruler.parse_lengths(_RULER_LENGTHS.value)
            except ValueError as e:
                raise evaluation.EvalError(str(e)) from None
            names = _RULER_TASKS.value or list(ruler.TASKS)
            unknown = [t for t in names if t not in ruler.TASKS]
            if unknown:
                raise evaluation.EvalError(f"--ruler_tasks: unknown {unknown}; expected some of "
                                           f"{', '.join(ruler.TASKS)}")
            results[task] = evaluation.ruler(cfg, params, tokenizer, lengths, names, _RULER_SAMPLES.value,
                                             prefill_chunk=_PREFILL_CHUNK.value)
        elif task == "chat":
            from nemojax.data.synthetic_chat import held_out_questions

            data = (training or {}).get("data", {})
            if data.get("source") != "synthetic" or (training or {}).get("task") not in ("sft", "dpo"):
                raise evaluation.EvalError("task chat asks held-out generated questions: it needs a checkpoint "
                                           "trained by an sft or dpo run on data.source 'synthetic'")
            questions = held_out_questions(data.get("shuffle_seed", 0), _CHAT_QUESTIONS.value)
            results[task] = evaluation.chat_accuracy(cfg, params, tokenizer, questions)
        else:
            results[task] = evaluation.generate_texts(
                cfg, params, tokenizer, _prompts(), _CHAT.value, max_new_tokens=_MAX_NEW.value,
                temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
                max_thinking_tokens=_THINKING.value, speculative_tokens=_SPECULATIVE.value,
                prefill_chunk=_PREFILL_CHUNK.value)
    return results


def _prompts() -> list[str]:
    from nemojax.data.sources import DataError, utf8_lines
    from nemojax.evaluation import EvalError

    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        if not os.path.isfile(_PROMPTS_FILE.value):
            raise EvalError(f"--prompts_file {_PROMPTS_FILE.value!r}: no such file")
        try:
            prompts += [line.rstrip("\n") for _, line in utf8_lines(_PROMPTS_FILE.value) if line.strip()]
        except DataError as e:
            raise EvalError(f"--prompts_file {e}") from None
    if not prompts:
        raise EvalError("task generate: give prompts with --prompt or a non-empty --prompts_file")
    return prompts


def print_table(results: dict) -> None:
    rows = []
    for task, result in results.items():
        if task == "generate":
            for item in result:
                rows.append((task, repr(item["prompt"])[:40], repr(item["completion"])))
        elif isinstance(result, dict):
            rows += [(task, k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result.items()]
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    for row in [("task", "metric", "value"), tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def write_json(path: str, results: dict) -> None:
    """Written to a temporary file and renamed, so a crash never leaves half a results file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(results, f, indent=2)
    os.replace(f.name, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from nemojax.checkpoint.hf import CheckpointError
    from nemojax.config import ConfigError
    from nemojax.evaluation import EvalError
    from nemojax.generate import GenerationError
    from nemojax.scoring import ScoringError
    from nemojax.tokenizer import TokenizerError

    try:
        results = run_tasks()
    except (CheckpointError, ConfigError, EvalError, GenerationError, ScoringError, TokenizerError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print_table(results)
    if _OUTPUT.value:
        write_json(_OUTPUT.value, results)
        print(f"results written to {_OUTPUT.value}")


if __name__ == "__main__":
    from nemojax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()
    app.run(main)
