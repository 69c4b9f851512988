"""Cached generation: prefill + decode equals the forward, greedy equals transformers, sampling, budgets."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import ModelConfig, NemotronH, generate, load_hf
from nemojax.generate import GenerationError, Sampling, chunked_prefill, sample
from nemojax.tokenizer import ThinkingTokens
from tests.conftest import VOCAB

PROMPT_LENGTHS = (5, 11, 2, 17)


@pytest.fixture(scope="module", params=["dense", "moe"])
def loaded(request, hf_checkpoints):
    torch_model, path = hf_checkpoints(request.param)
    cfg, params = load_hf(path)
    return torch_model, cfg, params


@pytest.fixture(scope="module")
def dense(hf_checkpoints):
    """For the tests of options, which do not depend on the block kinds."""
    return load_hf(hf_checkpoints("dense")[1])


def test_prefill_then_decode_equals_forward(loaded, token_batch):
    """Rows prefill different prefixes (1 token, a partial chunk, more than a chunk), then decode the
    rest of the sequence one token at a time: every position's logits equal the forward's."""
    _, cfg, params = loaded
    model = NemotronH(cfg)
    tokens = np.concatenate([token_batch, token_batch[:1, ::-1]])  # 3 rows of 21 tokens
    length = tokens.shape[1]
    full = np.asarray(model.apply({"params": params}, tokens))
    prefix = np.array([1, 7, 13], np.int32)
    padded = np.where(np.arange(length)[None] < prefix[:, None], tokens, 0)
    logits, state = model.apply({"params": params}, padded, prefix, length, method="prefill", mutable=["cache"])
    rows = np.arange(3)
    np.testing.assert_allclose(logits, full[rows, prefix - 1], rtol=1e-5, atol=1e-5)
    decode = jax.jit(lambda cache, tok, step: model.apply({"params": params, "cache": cache}, tok, prefix, step,
                                                          method="decode", mutable=["cache"]))
    checked = np.zeros(tokens.shape, bool)
    checked[rows, prefix - 1] = True
    cache = state["cache"]
    for step in range(length - prefix.min()):
        pos = np.minimum(prefix + step, length - 1)  # rows that reached the end repeat their last token
        logits, state = decode(cache, tokens[rows, pos], step)
        cache = state["cache"]
        live = prefix + step < length
        np.testing.assert_allclose(np.asarray(logits)[live], full[rows, pos][live], rtol=1e-5, atol=1e-5)
        checked[rows[live], pos[live]] = True
    assert all(checked[r, prefix[r] - 1:].all() for r in rows)  # row 0: every position


def test_greedy_equals_transformers_generate(loaded):
    """32 greedy tokens for a batch of prompts of different lengths. We decode them as one batch,
    transformers decodes each prompt alone: equal tokens also show that a row never sees its batch."""
    torch_model, cfg, params = loaded
    import torch

    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in PROMPT_LENGTHS]
    ours = generate(cfg, params, prompts, max_new_tokens=32)
    eos = cfg.eos_token_id
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            theirs = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()
        if eos in theirs:
            theirs = theirs[:theirs.index(eos)]
        assert got == theirs
        assert len(got) >= 8  # the comparison covers real decoding, not an immediate stop
    # Read 4 tokens at a time (prompts padded to 5 chunks, rows ending in different ones): the same tokens.
    assert generate(cfg, params, prompts, max_new_tokens=32, prefill_chunk=4) == ours


def test_chunked_prefill_equals_one_shot(dense):
    """A prefill in chunks of 5 tokens (SSD chunks of 8 cut mid-way; rows ending in the last chunk, a middle
    one and the first) gives the one-shot prefill's next-token logits and caches: every Mamba conv window
    and state, and the prompt's keys and values at real positions (padding is never read)."""
    cfg, params = dense
    ids = np.random.default_rng(4).integers(3, VOCAB, (3, 25)).astype(np.int32)
    lengths = jnp.array([25, 12, 1], jnp.int32)
    prefill = jax.jit(chunked_prefill, static_argnums=(0, 4, 5))
    one_shot, whole_cache = prefill(cfg, params, ids, lengths, 6, 25)
    chunked, chunked_cache = prefill(cfg, params, ids, lengths, 6, 5)
    np.testing.assert_allclose(chunked, one_shot, rtol=1e-5, atol=1e-5)
    real = np.arange(25)[None, None, :, None] < np.asarray(lengths)[:, None, None, None]
    compared = set()
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(whole_cache), jax.tree.leaves(chunked_cache)):
        name = jax.tree_util.keystr(path)
        assert want.shape == got.shape, name
        if "prompt_" in name:  # [b, kv heads, 25, head dim]
            want, got = np.where(real, want, 0), np.where(real, got, 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        compared.add(name.split("'")[-2])
    assert {"conv_x", "conv_B", "conv_C", "ssm", "prompt_k", "prompt_v"} <= compared


def test_chunked_prefill_memory_is_bounded(dense):
    """An 8k-token prompt read in chunks of 512: the compiled prefill's scratch memory is a small fraction
    of the one-shot prefill's (the chunk's activations instead of the prompt's; the caches are outputs)."""
    cfg, params = dense
    ids, lengths = jnp.zeros((1, 8192), jnp.int32), jnp.array([8192], jnp.int32)

    def scratch(chunk):
        prefill = jax.jit(functools.partial(chunked_prefill, cfg, max_new_tokens=1, chunk=chunk))
        return prefill.lower(params, ids, lengths).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = scratch(8192), scratch(512)
    print(f"prefill scratch at 8192 tokens: one shot {whole / 2**20:.1f} MiB, chunks of 512 {chunked / 2**20:.1f} MiB")
    assert chunked < 0.25 * whole, (chunked, whole)


def test_stop_tokens_end_generation(dense):
    cfg, params = dense
    prompt = [[5, 6, 7, 8]]
    free = generate(cfg, params, prompt, max_new_tokens=12, stop_tokens=())[0]
    stop = free[4]
    assert generate(cfg, params, prompt, max_new_tokens=12, stop_tokens=(stop,))[0] == free[:free.index(stop)]


def test_sampling_options():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draw = lambda s: np.asarray(sample(logits, keys, s))  # noqa: E731
    assert (draw(Sampling()) == 0).all()
    assert (draw(Sampling(temperature=1.0, top_k=1)) == 0).all()
    assert set(draw(Sampling(temperature=1.0, top_k=2))) == {0, 1}
    assert (draw(Sampling(temperature=1.0, top_p=0.4)) == 0).all()
    assert set(draw(Sampling(temperature=1.0, top_p=0.7))) == {0, 1}
    freq = np.bincount(draw(Sampling(temperature=1.0)), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    sharp = np.bincount(draw(Sampling(temperature=0.25)), minlength=4) / 4000
    assert sharp[0] > 0.85


def test_sampled_generation_is_seeded(dense):
    cfg, params = dense
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    a = generate(cfg, params, prompts, 10, temperature=1.5, top_k=20, seed=1, stop_tokens=())
    assert a == generate(cfg, params, prompts, 10, temperature=1.5, top_k=20, seed=1, stop_tokens=())
    assert a != generate(cfg, params, prompts, 10, temperature=1.5, top_k=20, seed=2, stop_tokens=())


def test_generation_errors(dense):
    cfg, params = dense
    short = dataclasses.replace(cfg, max_position_embeddings=20)
    with pytest.raises(GenerationError, match=r"prompt 1 has 15 tokens.*limit of 20 tokens"):
        generate(short, params, [[1, 2], list(range(15))], max_new_tokens=8)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        generate(cfg, params, [[]], max_new_tokens=4)
    with pytest.raises(GenerationError, match=r"outside the vocabulary \[0, 97\)"):
        generate(cfg, params, [[1, 500]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="needs `thinking="):
        generate(cfg, params, [[1, 2]], max_new_tokens=4, max_thinking_tokens=3)
    with pytest.raises(GenerationError, match=r"prefill_chunk = -4: must be an integer >= 0"):
        generate(cfg, params, [[1, 2]], max_new_tokens=4, prefill_chunk=-4)


# ----- the reasoning budget, on a model whose next token is hand-set ----------------------------

THINK, END_THINK, NEWLINE, EOS = 12, 13, 10, 2
HAND_SET = ModelConfig.from_hf(dict(
    hybrid_override_pattern="M*-", vocab_size=32, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, intermediate_size=16, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
    chunk_size=8, eos_token_id=EOS))


_init_hand_set = jax.jit(lambda key: NemotronH(HAND_SET).init(key, jnp.zeros((1, 4), jnp.int32))["params"])


def hand_set_params(transitions: dict[int, int]):
    """Every mixer's output projection is zero, so the final hidden state is the (one-hot) embedding of
    the current token, and the head maps token t to transitions[t] (else EOS)."""
    cfg = HAND_SET
    params = nn.unbox(_init_hand_set(jax.random.key(0)))
    zero_outputs = {"out_proj", "o_proj", "down_proj"}
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if path[-1].key in zero_outputs else p, params)
    head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    for t in range(cfg.vocab_size):
        head[t, transitions.get(t, EOS)] = 1.0
    return {**params, "embed": jnp.eye(cfg.vocab_size, cfg.hidden_size), "lm_head": jnp.asarray(head)}


THINKING = ThinkingTokens(THINK, END_THINK, newlines=(NEWLINE,))
# In thought: 20 21 22 \n 20 21 22 \n ...; after </think>: 30 31 <eos>.
WITH_NEWLINES = {THINK: 20, 20: 21, 21: 22, 22: NEWLINE, NEWLINE: 20, END_THINK: 30, 30: 31}
# In thought without newlines: 20 21 20 21 ...
NO_NEWLINES = {THINK: 20, 20: 21, 21: 20, END_THINK: 30, 30: 31}


def test_budget_closes_the_thought_at_the_next_newline():
    params = hand_set_params(WITH_NEWLINES)
    prompt = [[5, THINK]]  # the prompt opens the thought
    unbounded = generate(HAND_SET, params, prompt, 24, max_thinking_tokens=None)[0]
    assert END_THINK not in unbounded and len(unbounded) == 24
    got = generate(HAND_SET, params, prompt, 24, max_thinking_tokens=6, thinking=THINKING)[0]
    # 6 thinking tokens end inside "20 21 22 \n"; the thought ends after that newline.
    assert got == [20, 21, 22, NEWLINE, 20, 21, 22, NEWLINE, END_THINK, 30, 31]
    exact = generate(HAND_SET, params, prompt, 24, max_thinking_tokens=4, thinking=THINKING)[0]
    assert exact == [20, 21, 22, NEWLINE, END_THINK, 30, 31]


def test_budget_forces_the_end_after_the_grace():
    params = hand_set_params(NO_NEWLINES)
    got = generate(HAND_SET, params, [[5, THINK]], 24, max_thinking_tokens=4, thinking=THINKING,
                   thinking_grace=3)[0]
    assert got == [20, 21, 20, 21, 20, 21, 20, END_THINK, 30, 31]


def test_budget_counts_only_an_open_thought():
    """A prompt that already closed its thought (or never opened one) is not cut."""
    params = hand_set_params({**WITH_NEWLINES, 5: 20})
    closed = generate(HAND_SET, params, [[THINK, 20, END_THINK, 5]], 12, max_thinking_tokens=2,
                      thinking=THINKING)[0]
    assert END_THINK not in closed and len(closed) == 12
