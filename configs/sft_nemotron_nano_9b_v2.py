"""SFT of NVIDIA-Nemotron-Nano-9B-v2 on your conversations, from the Hub checkpoint:

    python train.py --config configs/sft_nemotron_nano_9b_v2.py --workdir /mnt/runs/nano9b-sft \
        --config.init_from=/ckpt/NVIDIA-Nemotron-Nano-9B-v2 --config.data.paths="('/data/chats-*.jsonl',)"

Each jsonl line: {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}.
The checkpoint's tokenizer and chat template render them; reasoning is the template's: a system prompt
with `/think` keeps the last reply's trace, `/no_think` opens the reply with `<think></think>`.
Then DPO: `--config.task=dpo --config.init_from=/mnt/runs/nano9b-sft` with pairs
({"messages" or "prompt", "chosen", "rejected"}) and a smaller learning rate.
"""

from configs import base, nemotron_nano_9b_v2


def get_config():
    c = nemotron_nano_9b_v2.get_config()
    c.task = "sft"
    c.init_from = ""  # the HF checkpoint directory (its tokenizer.json and chat template are used)
    c.model_from_checkpoint = True
    c.data.source = "chat"
    c.data.paths = ()
    c.data.tokenizer = ""  # default below: the checkpoint's own
    c.seq_len = 8192
    c.batch_size = 64
    c.total_steps = 2000
    c.optimizer = base.get_config().optimizer
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.checkpoint_every = 200
    c.mesh.fsdp = -1  # shard parameters and optimizer state over every device
    c.mesh.data = 1
    return c
