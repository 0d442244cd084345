"""The jitted train and eval steps of a Setup (fmjax.train.state), and evaluation.

A step of an objective with frozen inputs (DPO's reference) has them bound when it is made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.nn import model
from fmjax.nn import sharding as sharding_lib
from fmjax.posttrain import plan
from fmjax.runtime import distributed
from fmjax.train import objectives
from fmjax.train.state import Setup


def _loss_fn(s: Setup):
  """(trained, fixed, batch, frozen) -> (summed loss, stats) of the config's objective."""
  cfg = s.cfg
  objective = objectives.OBJECTIVES[cfg.objective.name]

  def loss(trained, fixed, batch, frozen):
    params = plan.model_params(dict(fixed, **trained), cfg)
    return objective(params, batch, s.spec, cfg.objective, **frozen)

  return loss


def _jit(s: Setup, fn, frozen, in_shardings, **kwargs):
  """fn(state or params, batch, frozen) jitted as (state or params, batch) -> outputs.

  Without frozen inputs (none given, none declared) it is jax.jit's own function, which
  can be lowered; with them, `frozen` (sharded as Setup.frozen_shardings) is bound.
  """
  if not s.frozen_shardings and not frozen:
    return jax.jit(lambda x, batch: fn(x, batch, {}), in_shardings=in_shardings, **kwargs)
  if set(frozen or {}) != set(s.frozen_shardings):
    raise ValueError(f"objective {s.cfg.objective.name} takes frozen inputs "
                     f"{sorted(s.frozen_shardings)}, given {sorted(frozen or {})}")
  jitted = jax.jit(fn, in_shardings=(*in_shardings, s.frozen_shardings), **kwargs)
  return lambda x, batch: jitted(x, batch, frozen)


def make_train_step(s: Setup, frozen: dict | None = None):
  """The jitted step (state, batch) -> (state, metrics); `frozen` as Setup.frozen_shardings."""
  cfg = s.cfg
  grad_fn = jax.value_and_grad(_loss_fn(s), has_aux=True)
  n_micro = cfg.train.microbatches

  def step(state, batch, frozen):
    trained, fixed = s.split(state["params"])
    (loss, stats), grads = sharding_lib.sum_over_microbatches(
        lambda b: grad_fn(trained, fixed, b, frozen), batch, n_micro, cfg.sharding.activations)
    denom = jnp.maximum(objectives.denominator(stats), 1.0)
    # A non-finite loss counts as a non-finite gradient, so the update is skipped.
    finite_loss = jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(finite_loss, g / denom, jnp.nan), grads)
    updates, opt_state = s.optimizer.update(grads, state["opt_state"], trained)
    stepped = dict(fixed, **optax.apply_updates(trained, updates))
    # Parameters no gradient reaches (the MoE router bias) move by the step's statistics.
    new_params, param_metrics = model.update_without_gradient(
        state["params"], stepped, stats, opt_state.notfinite_count == 0, s.spec)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    metrics = dict(stats, **param_metrics, grad_norm=optax.tree.norm(grads),
                   lr=s.lr_schedule(state["step"]),
                   nonfinite_consecutive=opt_state.notfinite_count,
                   nonfinite_total=opt_state.total_notfinite)
    return new_state, metrics

  return _jit(s, step, frozen, (s.state_shardings, s.batch_sharding),
              out_shardings=(s.state_shardings, None), donate_argnums=0)


def make_eval_step(s: Setup, frozen: dict | None = None):
  """The jitted (params, batch) -> summed statistics; `frozen` as in make_train_step."""
  loss = _loss_fn(s)

  def stats(params, batch, frozen):
    return loss(params, {}, batch, frozen)[1]

  return _jit(s, stats, frozen, (s.state_shardings["params"], s.batch_sharding))


def evaluate(s: Setup, eval_step, params, batches) -> dict:
  """Held-out statistics summed over `batches`.

  Each batch's sums are fetched before the next is dispatched: on fake CPU
  devices, many queued executions with collectives can deadlock XLA:CPU.
  """
  total = None
  for b in batches:
    stats = jax.device_get(eval_step(params, distributed.global_batch(b, s.batch_sharding)))
    total = stats if total is None else jax.tree.map(np.add, total, stats)
  return objectives.summarize(total)
