"""A scaling-law mini-sweep on the King James Bible: 4 FLOP budgets x 4 model sizes.

Each member is the size dial at depth 1-4 (d_model = 32 x depth, head dim 16,
d_ff = 8/3 d_model) trained to one FLOP budget (1e12 to 8e12, doubling), an
IsoFLOP design. One fake CPU device per run: at these sizes a single device
is the fastest layout on a 2-core machine.

  python -m fmjax.sweep --config=experiments/scaling_tiny.py --workdir=runs/scaling_tiny
  python -m fmjax.scaling fit runs/scaling_tiny/records.jsonl --out=runs/scaling_tiny/fit

The first command trains the 16 members one after another (re-running it skips
finished ones) and writes runs/scaling_tiny/records.jsonl; the second fits
L(N, D), the IsoFLOP profiles and L(C), writes fit.json and three plots, and
prints the compute-optimal model for larger budgets. On a cluster, add
--print_commands to the first command to get one launch command per member.

Train a single member directly, e.g. the depth-2 model at the smallest budget:

  python -m fmjax.main --config=experiments/scaling_tiny.py --config.model.depth=2 \
      --config.train.flops=1e12 --workdir=runs/scaling_tiny/flops1e+12_depth2
"""

from fmjax import config
from fmjax.scaling import sweep as sweep_lib

BUDGETS = (1e12, 2e12, 4e12, 8e12)
DEPTHS = (1, 2, 3, 4)


def get_config():
  c = config.base()
  c.model.update(vocab_size=1024, depth=2, aspect_ratio=32, head_dim=16, tie_embeddings=False)
  c.data.update(mixture="kjv", seq_len=128, eval_batches=16)
  c.optimizer.update(lr=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1)
  c.mesh.update(data=1, cpu_devices=1)
  c.train.update(flops=BUDGETS[0], batch_size=16, log_every=10, eval_every=0,
                 sample_tokens=0)
  c.checkpoint.update(every=0, keep=1)
  return c


def sweep():
  return sweep_lib.isoflop(BUDGETS, DEPTHS)
