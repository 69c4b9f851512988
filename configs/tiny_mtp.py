"""The default tiny hybrid with one MTP module (an attention and an MoE block, Super's `*E`), trained with
the MTP loss on the synthetic language: a model for speculative decoding on the CPU, e.g.

    python train.py --config configs/tiny_mtp.py --workdir /tmp/tiny_mtp
    python eval.py --checkpoint /tmp/tiny_mtp --tasks generate --prompt "a=1 b=2 |" --speculative_tokens 3
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.model.num_nextn_predict_layers = 2
    c.model.mtp_hybrid_override_pattern = "*E"
    c.mtp.loss_weight = 0.3
    return c
