"""Contrastive sentence embeddings from the default model (InfoNCE, in-batch negatives).

Starts from `experiments/pretrain_tiny.py`'s latest parameters and trains them,
with a 128-dimensional projection head and a learned temperature (clamped as
in CLIP), to embed two disjoint runs of verses of one King James chapter near
each other and away from the other 31 chapters of the batch (symmetric
InfoNCE over mean-pooled final hidden states; fmjax/posttrain/contrastive.py). The
negatives are the whole global batch, across the data-parallel shards.

  python -m fmjax.main --config=experiments/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m fmjax.main --config=experiments/contrastive_tiny.py --workdir=runs/contrastive_tiny

Held-out evaluation is one batch of all validation chapters' pairs: its
eval_accuracy and eval_recall_at_5 (metrics.jsonl) are recall@1 and recall@5
of finding each held-out anchor's positive among all of them (59 chapters, 56 after cutting to the 4 batch shards; chance 1/56).
What to expect (measured on a heavily shared 2-core CPU: about 35 minutes; far
less on an idle one): held-out recall@1 0.14 at step 50, 0.18 at 100 and 0.23
at 150, recall@5 0.39 -> 0.50 -> 0.55 (chance: 0.018 and 0.089); in-batch
train accuracy (31 negatives) rises to about 0.75.

Smoke test: add --config.train.steps=5.
"""

from fmjax import config

PRETRAINED = "runs/pretrain_tiny"


def get_config():
  c = config.base()
  c.model.update(vocab_size=2048, d_model=192, n_layers=4, n_heads=4, n_kv_heads=2,
                 d_ff=512, tie_embeddings=False)
  c.objective.name = "contrastive"
  c.objective.contrastive.update(pooling="mean", projection_dim=128, symmetric=True,
                                 temperature=0.07, max_logit_scale=100.0)
  c.data.update(seq_len=64, eval_batches=1)  # passages are cut to 64 tokens
  c.optimizer.update(lr=1e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2, cpu_devices=8)
  c.train.update(steps=150, batch_size=32, log_every=10, eval_every=50, sample_tokens=0)
  c.checkpoint.update(every=100, keep=2, init_from=PRETRAINED)
  return c
