"""The `small` benchmark hybrid with an MTP module, on the byte-level synthetic language (vocabulary 256):
the model benchmarks/decode.py times speculative decoding with. Its recipe (about 25 minutes on 2 CPU cores):

    python train.py --config configs/small_mtp.py --workdir /tmp/small_mtp
    python -m benchmarks.decode --speculative 3 --mtp_checkpoint /tmp/small_mtp

Two MTP depths are trained (one shared module), so chained drafts past the first are in distribution.
"""

import ml_collections

from configs import small


def get_config() -> ml_collections.ConfigDict:
    c = small.get_config()
    c.model.vocab_size = 256
    c.model.eos_token_id = 10  # the synthetic language's end of document
    c.model.num_nextn_predict_layers = 2
    c.model.mtp_hybrid_override_pattern = "*-"
    c.mtp.loss_weight = 0.3
    c.total_steps = 400
    c.batch_size = 8
    c.seq_len = 128
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.checkpoint_every = 200
    c.log_every = 10
    c.eval_every = 0
    return c
