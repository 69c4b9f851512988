"""Post-training: chat rendering and the assistant-only loss mask (a released template), packing, the SFT
loss, DPO's loss, gradient and reference, bad chat data, and SFT -> DPO end to end on the CPU."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import ModelConfig
from nemojax.data.chat import ChatEncoder, Conversation, Pair, read_conversations, read_pairs
from nemojax.data.packing import pack
from nemojax.data.sources import DataError
from nemojax.data.synthetic_chat import END_OF_TURN, TEMPLATE, conversation, pair
from nemojax.model import NemotronH
from nemojax.tokenizer import Tokenizer, from_file
from tests import background
from tests.conftest import BASE

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
# NVIDIA-Nemotron-Nano-9B-v2's chat template as released (the copy llama.cpp keeps in models/templates/).
NANO_V2_TEMPLATE = os.path.join(FIXTURES, "nvidia_nemotron_nano_v2.jinja")
NANO_V2_SPECIAL = ["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def nano_v2_tokenizer(tmp_path_factory):
    """A character-level tokenizer with Nano 2's special tokens, beside the released template."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    chars = sorted(set(chr(c) for c in range(32, 127)) | {"\n"})
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(NANO_V2_SPECIAL)
    path = tmp_path_factory.mktemp("nano_v2")
    tok.save(str(path / "tokenizer.json"))
    with open(NANO_V2_TEMPLATE) as f:
        config = {"chat_template": f.read(), "eos_token": "<SPECIAL_12>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return from_file(str(path))


def conversation_of(*messages, thinking=None) -> Conversation:
    return Conversation(tuple(messages), "test", thinking)


def labelled(pieces):
    """The text of (piece, carries loss) pieces, and each character's label."""
    return "".join(p for p, _ in pieces), np.concatenate([np.full(len(p), flag) for p, flag in pieces])


def check_mask_token_by_token(encoder, conv, pieces):
    text, labels = labelled(pieces)
    rendered, _ = encoder.spans(conv)
    assert rendered == text
    ids, mask = encoder.encode(conv)
    _, starts = encoder.tokenizer.encode_with_offsets(text)
    tokens = [encoder.tokenizer.decode([i]) for i in ids]
    assert list(zip(tokens, mask.tolist())) == list(zip(tokens, labels[starts].tolist()))


def test_released_template_masks_exactly_the_assistant_turns(nano_v2_tokenizer):
    """Nano 2's template: `/think` in the system prompt; the earlier reply's trace dropped, the last kept
    after the template's own `<think>` opening; each turn's loss ends with its `<SPECIAL_12>`."""
    conv = conversation_of({"role": "system", "content": "/think Be brief."},
                           {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "Adding.\n</think>\n\n4"},
                           {"role": "user", "content": "And 3+3?"},
                           {"role": "assistant", "content": "Again.\n</think>\n\n6"})
    head = [("<SPECIAL_10>System\nBe brief.\n\n<SPECIAL_11>User\n2+2?\n<SPECIAL_11>Assistant\n", False)]
    middle = [("\n\n<SPECIAL_11>User\nAnd 3+3?\n<SPECIAL_11>Assistant\n<think>\n\n", False)]
    first_reply, last_reply = "4\n<SPECIAL_12>", "Again.\n</think>\n\n6\n<SPECIAL_12>"
    every = ChatEncoder(nano_v2_tokenizer, turns="all")
    check_mask_token_by_token(every, conv, head + [(first_reply, True)] + middle + [(last_reply, True), ("\n\n", False)])
    last = ChatEncoder(nano_v2_tokenizer, turns="last")
    check_mask_token_by_token(last, conv, head + [(first_reply, False)] + middle + [(last_reply, True), ("\n\n", False)])
    # the generation prompt is exactly the text before the last reply
    assert every.prompt(conversation_of(*conv.messages[:-1])) == labelled(head + [(first_reply, False)] + middle)[0]

    off = conversation_of({"role": "system", "content": "/no_think"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"})
    check_mask_token_by_token(every, off, [("<SPECIAL_10>System\n\n\n<SPECIAL_11>User\n2+2?\n<SPECIAL_11>Assistant\n"
                                            "<think></think>", False), ("4\n<SPECIAL_12>", True), ("\n\n", False)])


def test_synthetic_template_keeps_the_last_trace_and_follows_enable_thinking():
    encoder = ChatEncoder(Tokenizer().with_template(TEMPLATE), end_of_turn=END_OF_TURN)
    messages = ({"role": "user", "content": "1+2="}, {"role": "assistant", "content": "<think>1+2=3</think>3"},
                {"role": "user", "content": "a=4 | a="}, {"role": "assistant", "content": "<think>a=4</think>4"})
    text, spans = encoder.spans(conversation_of(*messages, thinking=True))
    assert text == "<u>1+2=\n<a>3\n<u>a=4 | a=\n<a><think>a=4</think>4\n"
    assert [text[a:b] for a, b in spans] == ["3\n", "<think>a=4</think>4\n"]
    text, spans = encoder.spans(conversation_of(*messages, thinking=False))
    assert text.endswith("<a><think></think>4\n") and [text[a:b] for a, b in spans] == ["3\n", "4\n"]
    assert encoder.prompt(conversation_of(*messages[:1], thinking=False)) == "<u>1+2=\n<a><think></think>"
    ids, mask = encoder.encode(conversation_of(*messages, thinking=True))
    assert bytes(np.asarray(ids)[mask].tolist()) == b"3\n<think>a=4</think>4\n"


def test_packing_keeps_documents_whole_and_counts_overlong_ones():
    doc = lambda n, first_target=True: (np.arange(1, n + 1, dtype=np.int32), np.full(n, first_target))  # noqa: E731
    windows, stats = pack([[doc(5)], [doc(4)], [doc(12)], [doc(3)]], seq_len=10, pad_id=0)
    np.testing.assert_array_equal(windows["segment_ids"][0], [0] * 5 + [1] * 4 + [2])
    assert not windows["mask"][0, [0, 5, 9]].any() and windows["mask"][0, [1, 4, 6]].all()  # first tokens, pad
    np.testing.assert_array_equal(windows["tokens"][1], np.arange(1, 11))  # truncated to its first 10
    np.testing.assert_array_equal(windows["segment_ids"][2], [0] * 3 + [1] * 7)
    assert (stats.units, stats.windows, stats.truncated, stats.dropped) == (4, 3, 1, 0)
    _, stats = pack([[doc(5)], [doc(12)]], seq_len=10, pad_id=0, overlong="drop")
    assert (stats.units, stats.dropped) == (1, 1)
    windows, stats = pack([[doc(3), doc(2)], [doc(4), doc(4)], [doc(6), doc(6)]], seq_len=10, pad_id=0)
    np.testing.assert_array_equal(windows["segment_ids"][0], [0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # pair 0: 0 and 1
    assert stats.dropped == 1 and "1 dropped" in stats.describe("pairs")
    with pytest.raises(DataError, match="overlong.*'cut'"):
        pack([[doc(3)]], 10, 0, overlong="cut")


# ----- the losses ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_model():
    """A small byte-level hybrid (Mamba, attention, MLP), its parameters moved away from their init."""
    cfg = ModelConfig.from_hf(dict(BASE, vocab_size=256, hybrid_override_pattern="M*-", eos_token_id=10),
                              dtype="float32", param_dtype="float32")
    model = NemotronH(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return model, params


def alone_sums(model, params, docs):
    """Each (ids, mask) document run by itself: the sum of log p(ids[t+1] | ids[..t]) over its targets.
    The documents are right-padded into one batch (causal: padding after a document never reaches it)."""
    width = max(len(ids) for ids, _ in docs)
    ids = jnp.asarray(np.stack([np.pad(i, (0, width - len(i))) for i, _ in docs]))
    mask = jnp.asarray(np.stack([np.pad(m, (0, width - len(m))) for _, m in docs]))
    logits = model.apply({"params": params}, ids)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(logprobs * mask[:, 1:], axis=1)


SYNTHETIC = ChatEncoder(Tokenizer().with_template(TEMPLATE), end_of_turn=END_OF_TURN)


def test_sft_loss_is_the_masked_nll_of_each_conversation_alone(byte_model):
    from nemojax.train.step import loss_and_stats

    model, params = byte_model
    docs = [SYNTHETIC.encode(conversation(0, i)) for i in (0, 3, 4)]  # one of them two turns, with thinking
    seq_len = sum(len(ids) for ids, _ in docs) + 3  # a ragged end: padding
    windows, _ = pack([[d] for d in docs], seq_len, pad_id=0)
    assert len(windows["tokens"]) == 1
    batch = {k: jnp.asarray(v) for k, v in windows.items()}
    count = jnp.sum(batch["mask"][:, 1:])
    _, (loss, *_) = loss_and_stats(model, params, batch["tokens"], batch["mask"], count, 0.0,
                                   segment_ids=batch["segment_ids"])
    nll = -jnp.sum(jax.jit(lambda p: alone_sums(model, p, docs))(params))
    assert sum(mask[1:].sum() for _, mask in docs) == int(count)
    np.testing.assert_allclose(loss, nll / int(count), rtol=1e-5)


def test_dpo_loss_from_four_log_probabilities():
    from nemojax.train.dpo import Preference, pair_losses

    beta, eps = 0.1, 0.2
    pc, pr, rc, rr = -3.0, -5.0, -4.0, -4.5
    margin = beta * ((pc - rc) - (pr - rr))  # 0.15
    loss, chosen, rejected = pair_losses(pc, pr, rc, rr, Preference(beta))
    np.testing.assert_allclose(loss, math.log1p(math.exp(-margin)), rtol=1e-6)
    np.testing.assert_allclose((chosen, rejected), (beta * (pc - rc), beta * (pr - rr)), rtol=1e-6)
    grads = jax.grad(lambda *x: pair_losses(*x, Preference(beta))[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    s = 1 / (1 + math.exp(margin))  # sigmoid(-margin)
    np.testing.assert_allclose(grads, (-beta * s, beta * s, beta * s, -beta * s), rtol=1e-5)
    smoothed, _, _ = pair_losses(pc, pr, rc, rr, Preference(beta, eps))
    np.testing.assert_allclose(smoothed, (1 - eps) * math.log1p(math.exp(-margin)) + eps * math.log1p(math.exp(margin)),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def pair_batch(byte_model):
    """Two pairs (one with thinking) packed in one window with padding, and a perturbed reference."""
    model, params = byte_model
    pairs = [SYNTHETIC.encode_pair(pair(0, i)) for i in (1, 2)]
    seq_len = sum(len(ids) for p in pairs for ids, _ in p) + 5
    windows, _ = pack([list(p) for p in pairs], seq_len, pad_id=0)
    reference = jax.tree.map(lambda p: p * 0.97, params)
    return pairs, {k: jnp.asarray(v) for k, v in windows.items()}, reference


def direct_dpo_loss(model, params, reference, pairs, preference):
    """The mean pair loss from each reply run alone, written from the definition."""
    replies = [reply for p in pairs for reply in p]  # chosen, rejected, chosen, ...
    ratios = alone_sums(model, params, replies) - alone_sums(model, reference, replies)
    margins = preference.beta * (ratios[0::2] - ratios[1::2])
    return -jnp.mean(jax.nn.log_sigmoid(margins))


def assert_grads_close(grads, expected):
    """Each leaf within 1e-4 relative, or 1e-5 of the leaf's largest entry (fp32 sums in another order)."""
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * np.abs(e).max())


def test_dpo_objective_and_gradient_equal_the_direct_computation(byte_model, pair_batch):
    """Through the model: the packed, fused objective against each reply run alone; the precomputed
    reference gives the same; the reference's parameters get no gradient."""
    from nemojax.train.dpo import Preference, dpo_objective, reply_logprobs

    model, params = byte_model
    pairs, batch, reference = pair_batch
    preference = Preference(beta=0.5)
    objective = dpo_objective(model, preference, batch, 0.0, 1, reference)
    (value, (sums, _)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, batch)
    direct, direct_grads = jax.jit(jax.value_and_grad(
        lambda p, r: direct_dpo_loss(model, p, r, pairs, preference)))(params, reference)
    np.testing.assert_allclose(value, direct, rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], direct, rtol=1e-5)
    assert_grads_close(grads, direct_grads)

    precomputed = dict(batch, reference_logps=reply_logprobs(model, reference, batch["tokens"], batch["mask"],
                                                              batch["segment_ids"]))
    objective = dpo_objective(model, preference, precomputed, 0.0, 1)
    value2, grads2 = jax.jit(jax.value_and_grad(lambda p, b: objective(p, b)[0]))(params, precomputed)
    np.testing.assert_allclose(value2, value, rtol=1e-5)
    assert_grads_close(grads2, grads)


def test_identical_replies_give_log_2(byte_model):
    from nemojax.train.dpo import Preference, dpo_objective

    model, params = byte_model
    p = pair(0, 5)
    same = SYNTHETIC.encode_pair(Pair(p.prompt, p.chosen, p.chosen))
    windows, _ = pack([list(same)], sum(len(ids) for ids, _ in same) + 2, pad_id=0)
    batch = {k: jnp.asarray(v) for k, v in windows.items()}
    reference = jax.tree.map(lambda x: x * 1.05, params)  # a different model: rewards are not zero
    objective = dpo_objective(model, Preference(beta=2.0), batch, 0.0, 1, reference)
    _, (sums, _) = jax.jit(objective)(params, batch)
    np.testing.assert_allclose(sums["loss"], math.log(2), rtol=1e-6)
    assert abs(float(sums["chosen_reward"])) > 1e-3


def test_dpo_steps_change_the_policy_and_never_the_reference(byte_model, pair_batch):
    import optax

    from nemojax.train.dpo import Preference
    from nemojax.train.step import TrainState, train_step

    model, params = byte_model
    _, batch, reference = pair_batch
    optimizer, schedule = optax.adam(1e-2), optax.constant_schedule(1e-2)
    state = TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), optimizer.init(params))
    before = jax.tree.map(np.asarray, reference)
    step = jax.jit(lambda s, b, r: train_step(model, optimizer, s, b, 1, 0.0, 0.0, schedule,
                                              preference=Preference(0.5), reference=r), donate_argnums=0)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, reference)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)))


# ----- bad data --------------------------------------------------------------------------------------
def write_jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("record, error", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     r"messages\[0\] has unknown role 'robot'"),
    ({"text": "hi"}, "expected a `messages` field"),
    ("{not json", "not valid JSON"),
])
def test_bad_conversations_name_file_and_line(tmp_path, record, error):
    path = write_jsonl(tmp_path / "sft.jsonl", GOOD, record)
    with pytest.raises(DataError, match=f"sft.jsonl:2: .*{error}"):
        read_conversations(path)


def test_bad_pairs_and_missing_template_are_named(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", {"prompt": "q", "chosen": "a", "rejected": "b"},
                       {"prompt": "q", "chosen": "a"})
    with pytest.raises(DataError, match="pairs.jsonl:2: a preference pair needs a 'rejected' field"):
        read_pairs(path)
    assert read_pairs(write_jsonl(tmp_path / "ok.jsonl", {"messages": [{"role": "user", "content": "q"}],
                                                           "chosen": "a", "rejected": {"role": "assistant",
                                                                                       "content": "b"}}))
    with pytest.raises(DataError, match="tokenizer bytes has no chat template.*data.chat_template"):
        ChatEncoder(Tokenizer())


# ----- train.py: resume, and SFT -> DPO end to end ---------------------------------------------------------
def test_sft_resumes_exactly_after_sigkill(tmp_path):
    """An SFT run (packed generated chats, two microbatches, held-out evaluation) killed after a
    checkpoint and restarted ends with the losses and parameters of an uninterrupted one."""
    import signal

    from tests.test_train import final_params, read_metrics, run_until_checkpoint_then, train_cli

    flags = ["--config.task=sft", "--config.seq_len=64", "--config.data.synthetic_examples=300",
             "--config.data.eval_sequences=8", "--config.total_steps=10", "--config.checkpoint_every=4",
             "--config.grad_accum_steps=2", "--config.eval_every=5"]
    proc = train_cli(tmp_path / "a", *flags)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "300 conversations packed into" in out and "truncated" in out
    uninterrupted = read_metrics(tmp_path / "a")
    assert uninterrupted[-1]["eval_loss"] < uninterrupted[0]["loss"]
    code, out = run_until_checkpoint_then(signal.SIGKILL, str(tmp_path / "b"), flags, 4)
    assert code == -signal.SIGKILL, out
    assert 4 <= max(r["step"] for r in read_metrics(tmp_path / "b")) < 10
    proc = train_cli(tmp_path / "b", *flags)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    resumed = read_metrics(tmp_path / "b")
    assert [(r["step"], r["loss"], r.get("eval_loss")) for r in resumed] == \
        [(r["step"], r["loss"], r.get("eval_loss")) for r in uninterrupted]
    for x, y in zip(jax.tree.leaves(final_params(tmp_path / "b")), jax.tree.leaves(final_params(tmp_path / "a"))):
        np.testing.assert_array_equal(x, y)


def start_posttrain_chain() -> background.Job:
    """tests/fixtures/posttrain_chain.py: SFT then DPO from the README run's model (conftest.py starts
    it at collection; it waits for that run's last checkpoint, and starts that run if nothing has)."""
    import sys

    from tests.test_train import REPO, start_readme_run, subprocess_env

    pretrained = background.job("readme_run", start_readme_run).attrs["workdir"]
    root = background.workspace("posttrain_chain")
    return background.launch("posttrain_chain", [
        sys.executable, os.path.join(REPO, "tests", "fixtures", "posttrain_chain.py"), root, pretrained],
        subprocess_env(compilation_cache=False), root=root)


@pytest.mark.slow
def test_sft_then_dpo_raise_held_out_accuracy():
    """configs/sft_tiny.py from the README's pretrained tiny model, then configs/dpo_tiny.py from that:
    SFT teaches the chat format and answers (held-out accuracy, reasoning on and off, up from 0); DPO
    ranks right over wrong answers on held-out pairs (reward accuracy > 0.9) and answers better with
    reasoning on."""
    job = background.job("posttrain_chain", start_posttrain_chain)
    root = job.attrs["root"]
    console = os.path.join(root, "console.txt")  # the training runs' output
    assert job.wait() == 0, job.output(tail=3000) + (
        open(console).read()[-3000:] if os.path.exists(console) else "")
    with open(os.path.join(root, "results.json")) as f:
        results = json.load(f)
    before, sft, dpo = results["pretrained"], results["sft"], results["dpo"]
    print({stage: results[stage] for stage in ("pretrained", "sft", "dpo")})
    for mode in ("accuracy_thinking", "accuracy_no_thinking"):
        assert before[mode] <= 0.05 and sft[mode] >= before[mode] + 0.08, (mode, before, sft)
    held_out = results["dpo_metrics"][-1]
    assert held_out["eval_reward_accuracy"] > 0.9 and held_out["eval_reward_margin"] > 0, held_out
    assert dpo["accuracy_thinking"] > sft["accuracy_thinking"], (sft, dpo)
    assert set(dpo) == {"questions", "accuracy_thinking", "accuracy_no_thinking"} and dpo["questions"] == 64
    ruler = results["eval_ruler"]  # eval.py --tasks ruler on the same tiny checkpoint (its scores: the README)
    tasks = ("niah_single", "variable_tracking", "common_words")
    assert set(ruler) == {"samples"} | {f"{n}/{t}" for n in (256, 512) for t in (*tasks, "average")}, ruler
    assert all(0.0 <= v <= 1.0 for k, v in ruler.items() if k != "samples")
    sft_records = results["sft_metrics"]
    assert sft_records[-1]["eval_loss"] < sft_records[0]["loss"] / 4
