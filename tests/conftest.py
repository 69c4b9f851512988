"""Shared fixtures: random, perturbed transformers models saved in the Hub layout."""

from __future__ import annotations

import os

# The in-process tests compile hundreds of small programs and run each once or twice: LLVM's optimisation
# passes cost more than they save there (their CPU time halves at level 0). XLA_FLAGS is read when JAX
# starts its backend, so this comes before anything uses JAX. Subprocesses inherit it, except training
# runs (test_train.subprocess_env), which spend their time stepping and keep the user's flags.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{USER_XLA_FLAGS} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 97
BATCH, LENGTH = 2, 21  # the length is not a multiple of any chunk size used below

# Small shapes that do not divide evenly: 6 Mamba heads in 3 groups, GQA 6/2, odd widths.
BASE = dict(
    vocab_size=VOCAB, hidden_size=40, num_attention_heads=6, num_key_value_heads=2, head_dim=7,
    intermediate_size=52, mamba_num_heads=6, mamba_head_dim=6, ssm_state_size=10, n_groups=3,
    conv_kernel=4, chunk_size=8, time_step_min=0.001, layer_norm_epsilon=1e-5,
)
MOE = dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=22,
           moe_shared_expert_intermediate_size=30, routed_scaling_factor=2.5, n_group=2, topk_group=1,
           norm_topk_prob=True)

MODELS = {
    "dense": dict(BASE, hybrid_override_pattern="M-M*-"),
    "moe": dict(BASE, **MOE, hybrid_override_pattern="MEM*E"),
    "latent_moe": dict(BASE, **dict(MOE, n_group=1, norm_topk_prob=False), moe_latent_size=18,
                       hybrid_override_pattern="ME*E"),
    # Every projection bias transformers implements (Mamba in/out, MLP, shared expert, LatentMoE), and the
    # two bias fields it reads but does not use; a tied LM head.
    "biases": dict(BASE, **dict(MOE, n_group=1), moe_latent_size=18, use_bias=True, mlp_bias=True,
                   attention_bias=True, mamba_proj_bias=True, hybrid_override_pattern="M-*E"),
    "tied": dict(BASE, tie_word_embeddings=True, hybrid_override_pattern="M*-"),
}


def build_hf_model(kind: str, seed: int = 0, **extra_fields):
    """A transformers NemotronHForCausalLM with every weight and buffer moved away from its init value."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    fields = dict(MODELS[kind], **extra_fields)
    pattern = fields.pop("hybrid_override_pattern")
    cfg = NemotronHConfig(hybrid_override_pattern=pattern, **fields)
    cfg._experts_implementation = "eager"  # the loop over experts, the plainest reference
    model = NemotronHForCausalLM(cfg).eval()
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim == 1 else 0.5 * p.std().item() + 0.02
            p.add_(torch.randn_like(p) * scale)
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                buf.add_(torch.randn_like(buf) * 0.05)
        if cfg.tie_word_embeddings:  # transformers keeps (and saves) a separate head: make it the embedding
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Lazily saves one checkpoint per model kind; returns (torch model, directory)."""
    cache = {}

    def get(kind: str, variant: str = "plain"):
        key = (kind, variant)
        if key not in cache:
            import torch

            model = build_hf_model(kind)
            path = tmp_path_factory.mktemp(f"{kind}_{variant}")
            if variant == "sharded":
                model.save_pretrained(path, max_shard_size="30KB")
            elif variant == "bf16":
                model = model.to(torch.bfloat16)
                model.save_pretrained(path)
            else:
                model.save_pretrained(path)
            cache[key] = (model, str(path))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def token_batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)


# ----- long subprocess jobs started early, so they run beside the rest of the suite ----------------
BACKGROUND_CHECKS = {  # tests/fixtures script -> the test that reads its results
    "sharded_kernel_check": "tests/test_pallas.py::test_kernels_run_per_shard",
    "expert_parallel_check": "tests/test_sharding.py::test_expert_parallel_moe",
    "convert_memory_check": "tests/test_convert.py::test_peak_memory_stays_under_half_the_checkpoint",
    "sequence_parallel_check": "tests/test_sequence_parallel.py::test_sequence_sharded_op_equals_the_unsharded_one",
    "multihost_runs": "tests/test_sharding.py::test_two_processes_give_the_single_device_losses",
}


def start_jobs(selected: list[str]) -> None:
    """The subprocess jobs the selected tests read (tests/background.py): the README's training run, the
    post-training chain after it, the tiny MTP model's run, and the 8-device runs (the BACKGROUND_CHECKS
    scripts and test_sharding.py's meshes). Started at collection, they run on the core time the in-process
    tests leave."""
    from tests.test_sharding import start_check

    def wanted(prefix: str) -> bool:
        return any(nodeid.startswith(prefix) for nodeid in selected)

    if wanted("tests/test_train.py::test_readme_default_run_halves_its_loss"):
        from tests.test_train import start_readme_run

        start_readme_run()
    if wanted("tests/test_posttrain.py::test_sft_then_dpo_raise_held_out_accuracy"):
        from tests.test_posttrain import start_posttrain_chain

        start_posttrain_chain()  # (after the README run, whose last checkpoint it waits for)
    if wanted("tests/test_mtp.py::test_t"):  # the trained-MTP tests
        from tests.test_mtp import start_tiny_mtp_run

        start_tiny_mtp_run()
    for script, test in BACKGROUND_CHECKS.items():
        if wanted(test):
            start_check(script)
    if wanted("tests/test_sharding.py::test_mesh"):
        from tests.test_sharding import start_all

        start_all()


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller or the one pytest process: workers inherit it
        from tests import background

        background.directory()


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput") and not session.config.option.collectonly:  # (xdist: below)
        start_jobs([item.nodeid for item in session.items])


_XDIST_COLLECTED: list = []


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under pytest-xdist: every worker collects the same tests; the controller starts the jobs once."""
    if not _XDIST_COLLECTED and not node.config.option.collectonly:
        _XDIST_COLLECTED.append(node)
        start_jobs(list(ids))


def pytest_sessionfinish(session, exitstatus):
    from tests import background

    background.finish()
