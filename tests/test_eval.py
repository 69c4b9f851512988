"""eval.py, the scoring path and the lm-eval adapter, on a small random byte-level model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import ModelConfig, NemotronH
from nemojax.evaluation import choice, choice_loglikelihoods, encode_pair, perplexity, read_choice_examples
from nemojax.scoring import Scorer
from nemojax.tokenizer import Tokenizer
from tests.reference import save_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 48  # max_position_embeddings: long documents need several scoring windows
CFG = ModelConfig.from_hf(dict(
    hybrid_override_pattern="M*E-", vocab_size=256, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
    head_dim=10, intermediate_size=56, mamba_num_heads=4, mamba_head_dim=10, ssm_state_size=8, n_groups=2,
    chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=24, eos_token_id=10, bos_token_id=None, max_position_embeddings=LIMIT,
    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*-"))  # MTP: generation can speculate
CHOICES = [
    {"context": "The sky is", "choices": [" blue", " green", " a very long answer"], "label": 0},
    {"context": "1+1=", "choices": ["2", "3"], "label": 1},
    {"context": "", "choices": ["start", "begin"], "label": 0},
    {"context": "a=4 b=7 | b= ", "choices": ["7", "4"], "label": 0},
]
DOCS = ["a=1 b=2 c=3 | c=3 a=1 b=2 and then a long tail of text that needs more than one window", "short"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An Orbax checkpoint of a random model: no weight at an init value (norm scales, A_log, D, biases
    around 1; matrices scaled by their fan-in)."""
    shapes = jax.eval_shape(lambda: NemotronH(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    leaves, tree = jax.tree_util.tree_flatten(nn.unbox(shapes["params"]))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([1.0 + 0.3 * jax.random.normal(k, s.shape) if s.ndim == 1  # norms, A_log, D, biases
                             else 0.3 * jax.random.normal(k, s.shape) / np.sqrt(s.shape[0])
                             for s, k in zip(leaves, keys)])
    path = str(tmp_path_factory.mktemp("eval") / "ckpt")
    save_params(path, params, CFG)
    return path, params


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    (root / "choice.jsonl").write_text("".join(json.dumps(e) + "\n" for e in CHOICES))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n"
                                            for p in ["a=1 b=2 | a=", "x=5 | x="]))
    (root / "empty.jsonl").write_text("")
    return root


@jax.jit
def forward_logprobs(params, tokens):
    return jax.nn.log_softmax(NemotronH(CFG).apply({"params": params}, tokens)[0], axis=-1)


def direct_logprob(params, tokens: list[int], n: int) -> float:
    """Summed log-probability of the last n tokens, from the plain forward's logits (right-padded to
    one length, which a causal model's earlier logits do not see)."""
    logp = forward_logprobs(params, jnp.asarray([tokens + [0] * (LIMIT - len(tokens))], jnp.int32))
    return float(sum(logp[t - 1, tokens[t]] for t in range(len(tokens) - n, len(tokens))))


def test_choice_scores_equal_the_forward_pass(checkpoint):
    _, params = checkpoint
    scorer, tokenizer = Scorer(CFG, params, batch_size=4), Tokenizer()
    lls = choice_loglikelihoods(scorer, tokenizer, CHOICES)
    for example, got in zip(CHOICES, lls):
        for choice_text, ll in zip(example["choices"], got):
            context, continuation = encode_pair(tokenizer, example["context"], choice_text, prefix=10)
            np.testing.assert_allclose(ll, direct_logprob(params, context + continuation, len(continuation)),
                                       rtol=1e-5, atol=1e-5)


def test_choice_accuracy_from_loglikelihoods(checkpoint, data):
    _, params = checkpoint
    scorer, tokenizer = Scorer(CFG, params, batch_size=4), Tokenizer()
    lls = choice_loglikelihoods(scorer, tokenizer, CHOICES)
    acc = np.mean([np.argmax(ll) == e["label"] for ll, e in zip(lls, CHOICES)])
    acc_norm = np.mean([np.argmax([v / len(c) for v, c in zip(ll, e["choices"])]) == e["label"]
                        for ll, e in zip(lls, CHOICES)])
    result = choice(scorer, tokenizer, str(data / "choice.jsonl"))
    assert result == {"examples": 4, "acc": acc, "acc_norm": acc_norm}


def test_trailing_space_moves_to_the_continuation():
    context, continuation = encode_pair(Tokenizer(), "b= ", "7", prefix=10)
    assert context == list(b"b=") and continuation == list(b" 7")
    assert encode_pair(Tokenizer(), "", "hi", prefix=10) == ([10], list(b"hi"))


def test_rolling_windows_score_every_token_once():
    scorer = Scorer(CFG, params=None, max_length=16)
    tokens = list(range(20, 61))
    requests = scorer.rolling_requests(tokens, prefix=10)
    scored = [t for window, n in requests for t in window[len(window) - n:]]
    assert scored == tokens
    assert all(len(window) <= 16 for window, _ in requests)
    assert all(n == len(window) - 1 or window is requests[-1][0] for window, n in requests)


def test_perplexity_of_a_short_document_equals_the_forward(checkpoint, tmp_path):
    _, params = checkpoint
    path = tmp_path / "one.txt"
    path.write_text("hello there")
    result = perplexity(Scorer(CFG, params), Tokenizer(), [str(path)])
    tokens = [10, *b"hello there"]
    expected = -direct_logprob(params, tokens, len(tokens) - 1) / (len(tokens) - 1)
    assert result["tokens"] == len(tokens) - 1
    np.testing.assert_allclose(result["mean_nll"], expected, rtol=1e-5)


def test_choice_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: example 1: expected .*label"):
        read_choice_examples(str(bad))


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_eval_cli_runs_every_task(checkpoint, data, tmp_path):
    path, params = checkpoint
    output = tmp_path / "results.json"
    result = run_eval(f"--checkpoint={path}", "--tasks=perplexity,choice,recall,generate", "--tokenizer=bytes",
                      f"--data={data / 'docs.jsonl'}", f"--choice_data={data / 'choice.jsonl'}",
                      "--prompt=a=1 b=2 | a=", "--prompt=xyz",
                      "--max_new_tokens=6", "--recall_sequences=4", "--recall_seq_len=40", f"--output={output}")
    assert result.returncode == 0, result.stderr
    results = json.loads(output.read_text())
    assert "perplexity" in result.stdout and "mean_nll" in result.stdout
    assert results["perplexity"]["documents"] == 2
    assert results["perplexity"]["tokens"] == sum(len(d.encode()) for d in DOCS)
    assert results["choice"] == choice(Scorer(CFG, params), Tokenizer(), str(data / "choice.jsonl"))
    assert 0.0 <= results["recall"]["recall_accuracy"] <= 1.0
    from nemojax import generate
    expected = generate(CFG, params, [list(b"a=1 b=2 | a="), list(b"xyz")], 6)
    assert [r["completion"] for r in results["generate"]] == [Tokenizer().decode(e) for e in expected]


@pytest.fixture(scope="module")
def eval_main():
    """eval.py's main in this process: each error case fails before compiling anything, so a subprocess
    for each (seconds of imports) would cost more than the check. The CLI test above runs the script."""
    from absl import flags

    spec = importlib.util.spec_from_file_location("eval_script", os.path.join(ROOT, "eval.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args: str) -> None:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["eval.py", *args])
        script.main(["eval.py"])

    return run


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/nonexistent/ckpt", "--tasks=recall"], "checkpoint '/nonexistent/ckpt': no such file"),
    (["--checkpoint={tmp}", "--tasks=recall"], "is not a model"),
    (["--checkpoint={ckpt}", "--tasks=perplexity", "--tokenizer=bytes", "--data={data}/empty.jsonl"],
     "empty.jsonl: no documents"),
    (["--checkpoint={ckpt}", "--tasks=generate", "--tokenizer=bytes", "--prompt=" + "x" * 45,
      "--max_new_tokens=8"], "prompt 0 has 45 tokens; with max_new_tokens=8 that exceeds the model's limit of 48"),
    (["--checkpoint={ckpt}", "--tasks=perplexity"], "has no tokenizer"),
    (["--checkpoint={ckpt}", "--tasks=generate", "--tokenizer=bytes", "--prompt=x", "--max_new_tokens=4",
      "--speculative_tokens=-2"],
     "speculative_tokens = -2: must be an integer >= 0"),
    (["--checkpoint={ckpt}", "--tasks=recall", "--attention_impl=flash"],
     "`attention_impl` = 'flash': must be one of ('auto', 'xla', 'cudnn', 'splash')"),
])
def test_eval_cli_errors(eval_main, checkpoint, data, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, ckpt=checkpoint[0], data=data) for a in args]
    with pytest.raises(SystemExit) as exited:  # any other exception (a traceback) fails the test
        eval_main(*args, f"--output={tmp_path / 'out.json'}")
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    assert "eval.py: error:" in stderr and message in stderr, stderr
    assert not (tmp_path / "out.json").exists()


TASK_YAMLS = {
    "nj_choice": """
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "nj_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    "nj_generate": """
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["|"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
TASK_DATA = {"nj_choice": "choice.jsonl", "nj_rolling": "docs.jsonl", "nj_generate": "gen.jsonl"}


def test_lm_eval_adapter_runs_local_tasks(checkpoint, data, tmp_path):
    """`nemojax-lm-eval --model nemojax` on three local tasks (one per request type); the results equal
    what the same model gives through nemojax's own scoring and generation (plain greedy; the adapter
    speculates with the model's MTP layer)."""
    path, params = checkpoint
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, body in TASK_YAMLS.items():
        header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                  f"    test: {data / TASK_DATA[name]}\ntest_split: test\n")
        (tasks / f"{name}.yaml").write_text(header + body.format())
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "nemojax-lm-eval"), "--model", "nemojax", "--model_args",
         f"checkpoint={path},tokenizer=bytes,speculative_tokens=3", "--batch_size", "4", "--tasks", ",".join(TASK_YAMLS),
         "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]

    scorer, tokenizer = Scorer(CFG, params, batch_size=4), Tokenizer()
    lls = choice_loglikelihoods(scorer, tokenizer, CHOICES)
    assert results["nj_choice"]["acc,none"] == pytest.approx(np.mean([np.argmax(v) == e["label"]
                                                                       for v, e in zip(lls, CHOICES)]))
    rolling = [perplexity(scorer, tokenizer, [str(data / "docs.jsonl")])]
    words = sum(len(d.split()) for d in DOCS)
    nll = rolling[0]["mean_nll"] * rolling[0]["tokens"]
    assert results["nj_rolling"]["word_perplexity,none"] == pytest.approx(np.exp(nll / words), rel=1e-4)
    [samples_file] = list(out.rglob("samples_nj_generate_*.jsonl"))
    from nemojax import generate
    prompts = [json.loads(line)["prompt"] for line in (data / "gen.jsonl").read_text().splitlines()]
    new_tokens = generate(CFG, params, [list(p.encode()) for p in prompts], 6)
    expected = [Tokenizer().decode(t).split("|")[0] for t in new_tokens]
    got = [json.loads(line)["resps"][0][0] for line in samples_file.read_text().splitlines()]
    assert sorted(got) == sorted(expected)
