"""Pretrain a 2.4M-parameter dense decoder on the King James Bible, on CPU.

The default experiment: 8 fake CPU devices in a data=2 x fsdp=2 x tensor=2
mesh, a BPE tokenizer of 2048 pieces trained on the corpus, sequences of 256
packed tokens, 16 sequences a step.

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny

What to expect on a 2-core CPU: about 5 minutes (~3.6-4k tokens/s, 1M tokens),
held-out loss falling from ~7.6 at init to about 4.0 nats/token (4.92 at step 50,
4.09 at step 200), and a sample that reads like scripture ("And God said unto
him ..."). The run writes metrics.jsonl,
TensorBoard events, loss_curve.png, summary.json and checkpoints into the
workdir; running the command again resumes (and, once finished, re-evaluates).

Smoke test: add --config.train.steps=5.
"""

from fmjax import config


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.data.update(mixture="kjv", seq_len=256, eval_batches=8)
  c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=25, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=250, batch_size=16, log_every=5, eval_every=50)
  c.checkpoint.update(every=100, keep=2)
  return c
