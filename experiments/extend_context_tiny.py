"""Extend the default experiment's model from 256 to 1024 tokens of context with YaRN.

Starts from the parameters of a finished run of experiments/pretrain_tiny.py
(`checkpoint.init_from`: parameters only; a fresh optimizer and step), turns
on YaRN RoPE scaling by 4 with the original length 256, and continues
training on sequences of 1024 packed tokens at a lower learning rate. The
argument is the source workdir:

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.main --config=experiments/extend_context_tiny.py:runs/pretrain_tiny \\
      --workdir=runs/extend_context_tiny

Each step sees as many tokens as the default experiment's (4 x 1024 = 16 x
256). YaRN keeps the fast-turning rotary frequencies, which carry local order,
as they were, interpolates the slow ones so that 1024 positions span the
angles 256 used to, and sharpens the softmax by (0.1 ln 4 + 1)^2 = 1.29 to
make up for the flatter attention over 4x more keys. What to expect: the
held-out loss at 1024 starts near the 256-token model's (~4.0 nats/token) and
improves on it as the model uses the longer context.
"""

from fmjax import config

SOURCE = "runs/pretrain_tiny"


def get_config(arg=None):
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.model.rope_scaling.update(kind="yarn", factor=4.0, original_seq_len=256)
  c.data.update(mixture="kjv", seq_len=1024, eval_batches=8)
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=10, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=100, batch_size=4, log_every=5, eval_every=25)
  # Parameters only, from that workdir's latest checkpoint: the model must be the
  # source's (RoPE scaling adds no parameters).
  c.checkpoint.update(every=50, keep=2, init_from=arg or SOURCE)
  return c
