"""The scaling-law mini-sweep on a corpus whose irreducible loss is known exactly.

The twin of scaling_tiny.py: the same size dial (depth 1-4, d_model = 32 x
depth, head dim 16) and IsoFLOP design, at four budgets from 5e11 to 4e12
FLOPs, but trained on `synthetic(states=512, branching=8)`: a sparse Markov
chain over 512 states whose entropy rate is H = 1.7015 nats per token
(fmjax/data/synthetic.py). No model can beat H, so the parametric fit's
irreducible term E should land near it; the gap measures how far the fit's
extrapolation can be trusted. Every record carries `data_entropy_nats`, and
the fit reports E next to it.

  python -m fmjax.sweep --config=experiments/scaling_synthetic.py --workdir=runs/scaling_synthetic
  python -m fmjax.scaling fit runs/scaling_synthetic/records.jsonl --out=runs/scaling_synthetic/fit

What to expect on a 2-core CPU: about 30 minutes for the 16 members. The
smallest models sit well above H (a rank-32 unembedding cannot hold a
512 x 512 transition table), the largest come within a few tenths of a nat.
"""

from fmjax import config
from fmjax.scaling import sweep as sweep_lib

BUDGETS = (5e11, 1e12, 2e12, 4e12)
DEPTHS = (1, 2, 3, 4)


def get_config():
  c = config.base()
  c.model.update(vocab_size=516, depth=2, aspect_ratio=32, head_dim=16, tie_embeddings=False)
  c.data.update(mixture="synthetic(states=512, branching=8)", seq_len=128, eval_batches=16)
  c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1)
  c.mesh.update(data=1, cpu_devices=1)
  c.train.update(flops=BUDGETS[0], batch_size=16, log_every=10, eval_every=0,
                 sample_tokens=0)
  c.checkpoint.update(every=0, keep=1)
  return c


def sweep():
  return sweep_lib.isoflop(BUDGETS, DEPTHS)
