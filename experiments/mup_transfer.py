"""Does the best learning rate transfer across widths? A sweep under SP and under µP.

Two-layer decoders of width 64, 128 and 256 (head dim 32, d_ff = 8/3 d_model,
µP's base width 64) trained for 100 steps of 16 x 64 tokens of the King James
Bible (cosine schedule, 10 warmup steps, no gradient clipping), at six peak learning rates a factor
of 2 apart, under model.parametrization = "sp" and "mup". Every run sees the
same batches from the same initial seed; the score is the held-out loss after
the last step.

  nice -n 5 python experiments/mup_transfer.py [--out=runs/mup_transfer]

runs the grid in one process (one compile per width and parametrization; the
peak learning rate is an argument of the jitted step, multiplying the update
that fmjax.train.optim.make builds for a peak of 1, which is the same AdamW step),
prints the table of held-out losses and the best learning rate at each width,
and writes results.json and lr_sweep.png. The same grid through the trainer,
one run per member (slower: 36 processes):

  python -m fmjax.sweep --config=experiments/mup_transfer.py --workdir=runs/mup_transfer_sweep

Measured (2 shared CPU cores, 2026-11-30), held-out loss in nats/token, * the
best of each row. The default, 100 steps without gradient clipping (694 s,
load ~3):

  param  width   0.0010   0.0020   0.0040   0.0080   0.0160   0.0320   best lr
     sp     64   5.851    5.375    5.068*   5.219    5.329    5.570   0.0040
     sp    128   5.356    5.139    5.106*   5.231    5.382    5.891   0.0040
     sp    256   5.149    5.094*   5.457    5.328    5.541    5.740   0.0020
    mup     64   5.851    5.373    5.103*   5.113    5.374    5.301   0.0040
    mup    128   5.862    5.370    5.090*   5.418    5.663    5.432   0.0040
    mup    256   5.862    5.404    5.106*   5.209    5.625    5.540   0.0040

Under µP the best learning rate is the same grid point (0.004) at every width;
under SP it moves down at 256 (and SP's loss against lr turns ragged there).
With the trainer's default clipping (optimizer.clip_norm=1.0; 1773 s at load
6-16) SP's optimum halved per doubling (0.004, 0.002, 0.001) and µP's was 0.004
at 128 and 256 but 0.016 at the base width 64: clipping at a fixed global norm
is not width-invariant. At --steps=10 with clipping (446 s) µP picked 0.016 at
every width, SP 0.016, 0.008, 0.004 (tools/BENCHMARKS.md has all three tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

LRS = tuple(1e-3 * 2**k for k in range(6))  # 1e-3 .. 3.2e-2
WIDTHS = (64, 128, 256)
PARAMETRIZATIONS = ("sp", "mup")
BASE_WIDTH = 64
STEPS, BATCH, SEQ = 100, 16, 64


def get_config():
  # The fmjax.config import happens here so that `python experiments/mup_transfer.py`
  # can put the repository on sys.path first.
  from fmjax import config  # noqa: I001  (see above)
  c = config.base()
  c.model.update(vocab_size=2048, n_layers=2, head_dim=32, parametrization="mup",
                 mup_base_width=BASE_WIDTH, tie_embeddings=False)
  set_width(c, 128)
  c.data.update(mixture="kjv", seq_len=SEQ, eval_batches=8)
  # No gradient clipping: the global gradient norm depends on the width, so clipping
  # at a fixed norm is not width-invariant and moves the base width's optimum.
  c.optimizer.update(lr=LRS[3], schedule="cosine", warmup_steps=10, weight_decay=0.1,
                     clip_norm=0.0)
  c.mesh.update(data=1, cpu_devices=1)
  c.train.update(steps=STEPS, batch_size=BATCH, log_every=20, eval_every=0, sample_tokens=0)
  c.checkpoint.update(every=0, keep=1)
  return c


def set_width(c, width: int):
  hd = c.model.head_dim
  c.model.update(d_model=width, n_heads=width // hd, n_kv_heads=width // hd,
                 d_ff=hd * math.ceil(8 * width / 3 / hd))


def sweep():
  return [{"model.parametrization": p, "model.d_model": w, "model.n_heads": w // 32,
           "model.n_kv_heads": w // 32, "model.d_ff": 32 * math.ceil(8 * w / 3 / 32),
           "optimizer.lr": lr}
          for p in PARAMETRIZATIONS for w in WIDTHS for lr in LRS]


def batches(cfg, steps: int):
  """`steps` train batches and the held-out batches, as numpy arrays."""
  import itertools  # noqa: I001  (only the in-process sweep reads data)
  import numpy as np
  from fmjax.data import pipeline, tokenizer as tokenizer_lib
  tok = tokenizer_lib.from_config(cfg.data, cfg.model.vocab_size)
  train = list(itertools.islice(iter(pipeline.train_dataset(cfg.data, tok,
                                                            batch_size=cfg.train.batch_size)),
                                steps))
  held_out = pipeline.eval_batches(cfg.data, tok, batch_size=cfg.train.batch_size,
                                   num_batches=cfg.data.eval_batches)
  stack = lambda bs: {k: np.stack([b[k] for b in bs]) for k in ("tokens", "segment_ids",
                                                                 "positions")}
  return stack(train), stack(held_out)


def train_grid(cfg, lrs, train, held_out) -> list[float]:
  """The held-out loss after training `cfg` at each peak learning rate in `lrs`."""
  import jax  # noqa: I001  (only the in-process sweep runs jax)
  import jax.numpy as jnp
  from fmjax.nn import model, params as params_lib
  from fmjax.nn.spec import ModelSpec
  from fmjax.train import objectives, optim
  spec = ModelSpec.from_config(cfg)
  decls = model.param_decls(cfg.model)
  unit = cfg.optimizer.copy_and_resolve_references()
  unit.lr = 1.0  # the schedule's shape; the step multiplies by the peak
  tx = optim.make(unit, cfg.train.steps, decls)

  def loss_fn(params, batch):
    targets_BT, weights_BT = objectives.next_token_targets(batch)
    logits = model.forward(params, batch["tokens"], batch["segment_ids"], batch["positions"],
                           spec)
    total, stats = objectives.cross_entropy_sums(logits, targets_BT, weights_BT, 0.0)
    return total / stats["tokens"]

  @jax.jit
  def run(lr, key):
    params = params_lib.init(decls, key)

    def step(carry, batch):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + lr * u, params, updates)
      return (params, opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), train)
    losses = jax.lax.map(lambda b: loss_fn(params, b), held_out)
    return jnp.mean(losses)

  key = jax.random.key(cfg.train.seed)
  out = []
  for lr in lrs:
    loss = float(run(jnp.float32(lr), key))
    out.append(loss if math.isfinite(loss) else float("inf"))
  return out


def best(losses) -> int:
  return min(range(len(losses)), key=lambda i: losses[i])


def table(results: dict) -> str:
  lines = ["param  width " + " ".join(f"{lr:>8.4f}" for lr in LRS) + "   best lr"]
  for p, by_width in results.items():
    for w, losses in by_width.items():
      i = best(losses)
      lines.append(f"{p:>5} {w:>6} " + " ".join(
          (f"{x:>7.3f}" + ("*" if j == i else " ")) for j, x in enumerate(losses)) +
          f"  {LRS[i]:.4f}")
  return "\n".join(lines)


def plot(results: dict, path: str):
  import matplotlib  # noqa: I001  (only the in-process sweep plots)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
  for ax, (p, by_width) in zip(axes, results.items()):
    for w, losses in by_width.items():
      ax.plot(LRS, [min(x, 12.0) for x in losses], marker="o", label=f"width {w}")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{p}: held-out loss after {STEPS} steps")
    ax.set_xlabel("peak learning rate")
    ax.legend()
  axes[0].set_ylabel("held-out loss (nats/token)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/mup_transfer")
  parser.add_argument("--steps", type=int, default=STEPS)
  args = parser.parse_args()
  started = time.time()
  cfg = get_config()
  cfg.train.steps = args.steps
  train, held_out = batches(cfg, args.steps)
  results = {}
  for p in PARAMETRIZATIONS:
    results[p] = {}
    for w in WIDTHS:
      c = cfg.copy_and_resolve_references()
      c.model.parametrization = p
      set_width(c, w)
      results[p][w] = train_grid(c, LRS, train, held_out)
      print(f"{p} width {w}: " + ", ".join(f"{x:.3f}" for x in results[p][w]) +
            f" ({time.time() - started:.0f} s)", flush=True)
  print(table(results))
  for p in PARAMETRIZATIONS:
    picks = {w: LRS[best(x)] for w, x in results[p].items()}
    same = len(set(picks.values())) == 1
    print(f"{p}: best lr by width {picks}: "
          + ("the same grid point at every width" if same else "it moves"))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"lrs": LRS, "steps": args.steps, "results": results,
               "wall_time_s": time.time() - started}, f, indent=2)
  plot(results, os.path.join(args.out, "lr_sweep.png"))
  print(f"{time.time() - started:.0f} s; results in {args.out}")


if __name__ == "__main__":
  main()
