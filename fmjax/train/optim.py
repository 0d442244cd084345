"""Optimizer and learning-rate schedule from the config.

Each parameter's learning rate is the schedule's times its declaration's
`lr_scale` (1 under SP; µP's per-role multipliers, fmjax.nn.params.parametrize).
"""

from __future__ import annotations

import jax
import optax

from fmjax.nn import params as params_lib
from fmjax.nn.params import Param


def schedule(o, train_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay, WSD (stable then linear decay), or constant."""
  total = o.decay_steps or train_steps
  warmup = min(o.warmup_steps, total)
  peak, floor = o.lr, o.lr * o.min_lr_ratio
  rest = max(total - warmup, 1)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=o.min_lr_ratio)
  elif o.schedule == "wsd":
    decay = max(int(round(rest * o.wsd_decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [rest - decay])
  else:
    after = optax.constant_schedule(peak)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(decls):
  """Weight decay applies to matrices, not to norm scales (whatever their stacking)."""
  return jax.tree.map(lambda p: sum(a != "layers" for a in p.axes) >= 2, decls,
                      is_leaf=lambda x: isinstance(x, Param))


def scale_per_param(scales) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its number in `scales` (a tree like the params)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(o, train_steps: int, decls) -> optax.GradientTransformation:
  lr, mask = schedule(o, train_steps), decay_mask(decls)
  if o.name == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  else:
    opt = optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
  scales = params_lib.lr_scales(decls)
  if any(s != 1.0 for s in jax.tree.leaves(scales)):
    # The whole step (decoupled weight decay too, as with torch's per-group lr).
    opt = optax.chain(opt, scale_per_param(scales))
  if o.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
  return opt
