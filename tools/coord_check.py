"""Coordinate check: activation scale per layer type over the first steps, at several widths.

  python tools/coord_check.py [--widths=64,128,256,512] [--steps=5] [--lr=1e-2] \
      [--base_width=64] [--out=runs/coord_check.png]

Trains the same small decoder (2 layers, head dim 16, d_ff = 4 d_model) at each
width with the real optimizer (fmjax.train.optim: AdamW, a constant learning
rate, µP's per-parameter multipliers) on one fixed batch of random tokens, under
SP and under µP, and records the RMS of each layer type's output on that batch
before each step: the embedding, attention and MLP outputs (each layer's), the
final hidden state and the logits. Under µP every curve is the same at every
width (Tensor Programs V); under SP they drift apart as the width grows, most of
all the logits and the updates they take. The PNG has one panel per
(parametrization, layer type): RMS against width, one line per step. The
console gets each layer type's slope of log RMS against log width at the last
step: about 0 under µP.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fmjax import config as config_lib  # noqa: E402
from fmjax.nn import block as block_lib  # noqa: E402
from fmjax.nn import layers, mlp, model  # noqa: E402
from fmjax.nn import params as params_lib  # noqa: E402
from fmjax.nn.spec import ModelSpec  # noqa: E402
from fmjax.train import optim  # noqa: E402

KINDS = ("embedding", "attention", "mlp", "hidden", "logits")


def config(width: int, parametrization: str, base_width: int, lr: float, vocab: int = 256,
           n_layers: int = 2):
  c = config_lib.base()
  c.model.update(vocab_size=vocab, d_model=width, n_layers=n_layers, head_dim=16, n_heads=width // 16,
                 n_kv_heads=width // 16, d_ff=4 * width, parametrization=parametrization,
                 mup_base_width=base_width, scan_layers=False)
  c.optimizer.update(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0,
                     clip_norm=0.0)
  return c


def activations(params, tokens_BT, spec) -> dict:
  """RMS of each layer type's output on `tokens_BT` (attention and MLP: mean over layers)."""
  m = spec.model
  B, T = tokens_BT.shape
  segments_BT = jnp.ones((B, T), jnp.int32)
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  cos, sin = block_lib.rope_angles(positions_BT, m)
  rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
  x_BTD = model.embed(params, tokens_BT, spec)
  out = {"embedding": rms(x_BTD), "attention": 0.0, "mlp": 0.0}
  stack = params["layers"]
  for i in range(m.n_layers):  # block_lib.apply's two halves, their outputs kept
    p = jax.tree.map(lambda a: a[i], stack)
    h_BTD = layers.norm(x_BTD, p["attn_norm"], m)
    a_BTD, _ = block_lib.ATTENTION[m.attention].apply(p, h_BTD, cos, sin, segments_BT, spec)
    x_BTD = x_BTD + a_BTD
    y_BTD = mlp.apply(p, layers.norm(x_BTD, p["mlp_norm"], m), spec)
    x_BTD = x_BTD + y_BTD
    out["attention"] += rms(a_BTD) / m.n_layers
    out["mlp"] += rms(y_BTD) / m.n_layers
  h_BTD = model.final_norm(params, x_BTD, spec)
  out["hidden"] = rms(x_BTD)
  out["logits"] = rms(model.unembed(params, h_BTD, spec))
  return out


def run(width: int, parametrization: str, base_width: int = 64, steps: int = 5,
        lr: float = 1e-2, batch: int = 8, seq: int = 32, seed: int = 0,
        n_layers: int = 2) -> dict:
  """{kind: [RMS before step 0, 1, ..., steps - 1]} for one width."""
  cfg = config(width, parametrization, base_width, lr, n_layers=n_layers)
  spec = ModelSpec.from_config(cfg)
  decls = model.param_decls(cfg.model)
  tx = optim.make(cfg.optimizer, steps, decls)
  tokens_BT = jax.random.randint(jax.random.key(seed + 1), (batch, seq + 1), 0,
                                 cfg.model.vocab_size)
  inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]

  def loss(params):
    segments_BT = jnp.ones_like(inputs_BT)
    positions_BT = jnp.broadcast_to(jnp.arange(seq), inputs_BT.shape)
    logits_BTV = model.forward(params, inputs_BT, segments_BT, positions_BT, spec)
    logp_BTV = jax.nn.log_softmax(logits_BTV)
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1))

  @jax.jit
  def step(params, opt_state):
    acts = activations(params, inputs_BT, spec)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state, acts

  params = params_lib.init(decls, jax.random.key(seed))
  opt_state = tx.init(params)
  record = {k: [] for k in KINDS}
  for _ in range(steps):
    params, opt_state, acts = step(params, opt_state)
    for k in KINDS:
      record[k].append(float(acts[k]))
  return record


def check(widths, parametrization: str, **kw) -> dict:
  """{width: run(width, ...)}."""
  return {w: run(w, parametrization, **kw) for w in widths}


def slopes(records: dict, step: int = -1) -> dict:
  """Per layer type, the least-squares slope of log RMS against log width at `step`:
  0 when the scale does not depend on width."""
  widths = sorted(records)
  x = np.log(widths)
  return {k: float(np.polyfit(x, np.log([records[w][k][step] for w in widths]), 1)[0])
          for k in KINDS}


def plot(results: dict, path: str) -> str:
  """results: {parametrization: {width: record}}; one row of panels per parametrization."""
  import matplotlib  # noqa: I001  (only this command plots)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(results)
  fig, axes = plt.subplots(len(rows), len(KINDS), figsize=(3.2 * len(KINDS), 3 * len(rows)),
                           squeeze=False)
  for r, name in enumerate(rows):
    records = results[name]
    widths = sorted(records)
    steps = len(records[widths[0]][KINDS[0]])
    for c, kind in enumerate(KINDS):
      ax = axes[r][c]
      for t in range(steps):
        ax.plot(widths, [records[w][kind][t] for w in widths], marker="o",
                color=plt.cm.viridis(t / max(steps - 1, 1)), label=f"step {t}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{name}: {kind}")
      ax.set_xlabel("width (d_model)")
      if c == 0:
        ax.set_ylabel("RMS")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--widths", default="64,128,256,512")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--base_width", type=int, default=64)
  parser.add_argument("--out", default="runs/coord_check.png")
  args = parser.parse_args()
  widths = [int(w) for w in args.widths.split(",")]
  if len(widths) < 2 or any(w <= 0 or w % 16 for w in widths):
    sys.exit(f"fmjax: --widths={args.widths} must be 2 or more multiples of the head dim 16")
  results = {}
  for name in ("sp", "mup"):
    results[name] = check(widths, name, base_width=args.base_width, steps=args.steps,
                          lr=args.lr)
    s = slopes(results[name])
    print(f"{name:>3}: slope of log RMS in log width at step {args.steps - 1}: " +
          ", ".join(f"{k} {v:+.2f}" for k, v in s.items()))
  print(f"plot: {plot(results, args.out)}")


if __name__ == "__main__":
  main()
