"""SFT of the README's tiny model on generated chat (recall and sum questions, reasoning on and off), on
the CPU in a couple of minutes; after the README's first command:

    python train.py --config configs/sft_tiny.py --workdir /tmp/nemojax-sft-tiny
    python eval.py --checkpoint /tmp/nemojax-sft-tiny --tasks chat
"""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.task = "sft"
    c.init_from = "/tmp/nemojax-tiny"  # the README run's workdir: its newest checkpoint
    c.total_steps = 300
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 20
    c.checkpoint_every = 50
    c.eval_every = 150
    return c
