"""Defaults shared by every config; a model config overrides only what differs.

`get_config()` returns the training config; `config.model` holds the architecture in Hugging Face's
config.json field names (read by `ModelConfig.from_hf`). Every field can be overridden from the
command line: `python train.py --config configs/tiny.py --config.total_steps=200 --config.seed=1`.
"""

import ml_collections

# Facts shared by all released Nemotron hybrids (docs/models.md).
RELEASED_MODEL_DEFAULTS = dict(
    vocab_size=131072, tie_word_embeddings=False, layer_norm_epsilon=1e-5, conv_kernel=4, chunk_size=128,
    n_groups=8, mamba_head_dim=64, ssm_state_size=128, head_dim=128, num_key_value_heads=8,
    time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4, bos_token_id=1, pad_token_id=0,
    eos_token_id=2, use_conv_bias=True, mamba_ssm_cache_dtype="float32",
)


# Shared by the Nemotron 3 MoE family (Nano, Super, Ultra).
NEMOTRON3_DEFAULTS = dict(
    num_key_value_heads=2, max_position_embeddings=262144, n_shared_experts=1, n_group=1, topk_group=1,
    norm_topk_prob=True, eos_token_id=11,
)


def model_config(**fields) -> ml_collections.ConfigDict:
    """A released model's architecture: the shared defaults plus `fields`."""
    return ml_collections.ConfigDict({**RELEASED_MODEL_DEFAULTS, **fields})


def nemotron3_model_config(**fields) -> ml_collections.ConfigDict:
    """A Nemotron 3 model's architecture: the shared and the family defaults plus `fields`."""
    return model_config(**{**NEMOTRON3_DEFAULTS, **fields})


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_config()  # replaced by each model config
    # pretrain: next-token loss on every token. sft: on the assistant's tokens of chat conversations.
    # dpo: direct preference optimisation on (chosen, rejected) replies against a frozen reference.
    c.task = "pretrain"
    c.seed = 0
    c.total_steps = 10_000
    c.batch_size = 8  # sequences per optimizer step (all microbatches, all hosts)
    c.grad_accum_steps = 1  # microbatches per step; batch_size must divide by it
    c.seq_len = 4096
    c.param_dtype = "float32"  # stored parameters and optimizer state
    c.dtype = "bfloat16"  # matmul inputs
    c.remat = "full"  # none | full | dots (save matmul outputs, recompute the rest); full fits big models
    c.scan_layers = True  # one lax.scan per repeated group of blocks: compile time stays flat with depth
    # auto: the fused kernels on accelerators (GPU: pallas SSD + cudnn; TPU: pallas SSD + splash), XLA on the
    # CPU (nemojax.config.AUTO_IMPLS). Explicit: xla | pallas (interpreted, so slow, on the CPU) for the SSD,
    # xla | cudnn (GPU flash attention) | splash (TPU flash attention) for attention.
    c.ssm_impl = "auto"
    c.attention_impl = "auto"
    # The linear layers' low-precision recipe (nemojax/precision.py): bf16 (none) | fp8 (Nemotron-H's) |
    # nvfp4 (Nemotron 3 Super's) | mxfp8. Quantization is simulated except FP8 GEMMs on CUDA, which run natively.
    c.precision = "bf16"

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
        schedule="cosine",  # cosine (warmup + cosine decay) | wsd (warmup, stable, decay)
        warmup_steps=100,
        decay_fraction=0.2,  # wsd: the last fraction of steps decays linearly
        min_lr_ratio=0.1,  # the schedule ends at learning_rate x min_lr_ratio
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,  # not applied to norms, biases, A_log, D, dt_bias
        grad_clip=1.0,  # global-norm clipping; 0 turns it off
    ))
    c.moe = ml_collections.ConfigDict(dict(
        bias_update_rate=1e-3,  # correction bias += rate * sign(mean load - load), once per step
        aux_loss_coef=1e-4,  # sequence-level balance loss
    ))

    c.mtp = ml_collections.ConfigDict(dict(
        # Models with MTP layers (num_nextn_predict_layers > 0): loss = lm loss + loss_weight / depths x the
        # sum of the depths' losses (docs/models.md). 0 leaves the MTP layers untrained.
        loss_weight=0.3,
    ))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # synthetic | text (txt / jsonl with a `text` field) | tokens (.npy / raw memmap)
        paths=(),  # files (globs allowed) for text and tokens
        tokenizer="",  # tokenizer.json (HF `tokenizers`) for text
        text_field="text",  # jsonl key
        tokens_dtype="int32",  # raw .bin token files
        shuffle_seed=0,
        eval_sequences=64,  # synthetic: held-out sequences for loss and recall accuracy
        # Keep packed documents apart: Mamba state, conv window and attention restart at each document
        # (the XLA paths; the Pallas SSD and cuDNN / splash kernels do not take segment ids yet). SFT and
        # DPO windows always keep their conversations apart.
        isolate_documents=False,
        # sft / dpo: source synthetic (generated conversations / pairs) or chat (jsonl files at `paths`).
        synthetic_examples=4000,  # generated conversations or pairs
        chat_template="",  # a .jinja file replacing the tokenizer's chat template
        overlong="truncate",  # a conversation longer than seq_len: truncate (keep its start) or drop
    ))

    c.chat = ml_collections.ConfigDict(dict(  # sft / dpo: how conversations become tokens and a loss mask
        turns="all",  # all | last: which assistant turns carry loss (dpo: the reply)
        enable_thinking=True,  # the template argument for conversations that do not set `enable_thinking`
        end_of_turn="",  # text closing an assistant turn, learned with it (default: the tokenizer's eos_token)
    ))
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # the KL strength: reward = beta x (log pi - log pi_ref) of a reply
        label_smoothing=0.0,  # conservative DPO: the chance a preference label is flipped
        sft_loss_weight=0.0,  # + this x the chosen replies' mean token NLL (NeMo-Aligner's; RPO's alpha)
        # model: the init_from weights, frozen beside the trained ones (no gradients, no optimizer state);
        # precomputed: the reference's log-probabilities, computed once in a first pass (no second model).
        reference="model",
    ))

    # -1: the remaining devices. sequence: context parallelism (each device a span of every sequence).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, sequence=1))

    c.init_from = ""  # HF checkpoint directory or Orbax checkpoint to start from (ignored when resuming)
    c.model_from_checkpoint = False  # take the architecture from init_from instead of config.model
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.log_every = 10
    c.eval_every = 0  # 0: only at the end
    c.peak_flops_per_device = 0.0  # for MFU; 0: look the device kind up (unknown kinds: no MFU)
    # Resuming checks the saved config: a change to the model, data, batch, seq_len, seed or optimizer is an
    # error unless this is set (total_steps, logging, checkpointing, mesh and kernels may always change).
    c.allow_config_change = False
    return c
