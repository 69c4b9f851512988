"""lm-eval-harness model `nemojax` (optional extra `eval`): the same scoring and generation code as eval.py.

lm-eval 0.4 finds models only in its own registry and has no plugin discovery, so the model is
registered when this module is imported. The `nemojax-lm-eval` command is `lm_eval` with it imported:

    nemojax-lm-eval --model nemojax --model_args checkpoint=CKPT,batch_size=8 --tasks hellaswag
    nemojax-lm-eval --model nemojax --model_args checkpoint=CKPT --tasks my_task --include_path ./my_tasks

From Python: `import nemojax.lm_eval_adapter` before `lm_eval.simple_evaluate(model="nemojax", ...)`.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nemojax.checkpoint.loading import load_model
from nemojax.evaluation import encode_pair, prefix_token
from nemojax.generate import generate
from nemojax.scoring import Scorer
from nemojax.tokenizer import for_checkpoint


@register_model("nemojax")
class NemojaxLM(LM):
    """model_args: checkpoint (Orbax or HF directory), tokenizer (default: the checkpoint's), dtype,
    batch_size, max_length (default: the model's max_position_embeddings), max_gen_toks, speculative_tokens
    (drafts per backbone call from the model's MTP layers; 0: none)."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 speculative_tokens: int | str = 0, **_: Any):
        super().__init__()
        runtime = {"param_dtype": dtype, "dtype": dtype} if dtype else {}
        self.cfg, self.params, training = load_model(checkpoint, **runtime)
        self.tokenizer = for_checkpoint(checkpoint, tokenizer, training)
        batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.cfg, self.params, batch, int(max_length) if max_length is not None else None)
        self.prefix = prefix_token(self.cfg)
        self.max_gen_toks = int(max_gen_toks)
        self.speculative_tokens = int(speculative_tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, context, continuation, self.prefix)
                 for context, continuation in (r.args for r in requests)]
        return self.scorer.score([self.scorer.continuation_request(*pair) for pair in pairs])

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows = [self.scorer.rolling_requests(self.tokenizer.encode(r.args[0]), self.prefix) for r in requests]
        scores = iter(self.scorer.score([w for doc in windows for w in doc]))
        return [sum(next(scores)[0] for _ in doc) for doc in windows]

    def generate_until(self, requests) -> list[str]:
        """Requests with the same options decode together, `batch_size` prompts at a time."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._generation_options(request.args[1]), []).append(i)
        outputs = [""] * len(requests)
        for (until, max_new, temperature, top_k, top_p), members in groups.items():
            for start in range(0, len(members), self.scorer.batch_size):
                batch = members[start:start + self.scorer.batch_size]
                prompts = [self.tokenizer.encode(requests[i].args[0])[-(self.scorer.max_length - max_new):]
                           or [self.prefix] for i in batch]
                tokens = generate(self.cfg, self.params, prompts, max_new, temperature=temperature, top_k=top_k,
                                  top_p=top_p, speculative_tokens=self.speculative_tokens)
                for i, new in zip(batch, tokens):
                    text = self.tokenizer.decode(new)
                    for stop in until:  # stop strings cut the text; generation itself stops at eos tokens
                        text = text.split(stop)[0]
                    outputs[i] = text
        return outputs

    def _generation_options(self, options: dict) -> tuple:
        until = options.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
        sampling = options.get("do_sample", False)
        return (until, int(options.get("max_gen_toks", self.max_gen_toks)),
                float(options.get("temperature", 0.0)) if sampling else 0.0,
                int(options.get("top_k") or 0), float(options.get("top_p") or 1.0))


def main() -> None:
    """`nemojax-lm-eval`: lm-eval's command line, with the `nemojax` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
