"""DPO of the SFT'd tiny model (configs/sft_tiny.py) on generated preference pairs (the right answer to a
recall or sum question chosen, a wrong one rejected), against its starting weights as the frozen reference:

    python train.py --config configs/sft_tiny.py --workdir /tmp/nemojax-sft-tiny
    python train.py --config configs/dpo_tiny.py --workdir /tmp/nemojax-dpo-tiny
    python eval.py --checkpoint /tmp/nemojax-dpo-tiny --tasks chat
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.task = "dpo"
    c.init_from = "/tmp/nemojax-sft-tiny"  # sft_tiny's workdir: its newest checkpoint
    c.total_steps = 150
    c.batch_size = 16  # ~17 pairs per step
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.checkpoint_every = 50
    c.dpo.beta = 0.1
    c.dpo.sft_loss_weight = 0.2  # keeps the right answers' likelihood up while the wrong ones sink
    return c
