"""The sharded train step and the training loop.

State is a dict {step, params, opt_state}. Its shardings are derived from the
parameter declarations; it is created already sharded, updated by one jitted
step with donated buffers, and checkpointed with the data iterator's position.
The optimizer state covers the trained parameters only (all of them, or the
adapters and heads under LoRA; fmjax.posttrain.plan). Inputs that are not trained
and not checkpointed (DPO's reference parameters) are the step's `frozen`
argument, sharded by `Setup.frozen_shardings`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import config as config_lib
from fmjax.nn import cost, model, moe
from fmjax.train import objectives, optim
from fmjax.posttrain import plan as posttrain
from fmjax.nn import params as params_lib
from fmjax.nn import sharding as sharding_lib


NEVER_APPLY_NONFINITE = 2**31 - 1  # optax applies them after this many in a row


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step functions are built from: derived once from the config."""
  cfg: object
  mesh: jax.sharding.Mesh
  decls: dict
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  state_shardings: dict
  batch_sharding: NamedSharding
  frozen_shardings: dict  # {} or {"reference": shardings like the model's parameters}

  @property
  def abstract_state(self):
    """Shapes, dtypes and shardings of the state: the target of a restore."""
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "params": params_lib.abstract(self.decls)}
    shapes["opt_state"] = jax.eval_shape(self.optimizer.init,
                                         posttrain.split(self.cfg, shapes["params"])[0])
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)


def setup(cfg, mesh) -> Setup:
  decls = posttrain.param_decls(cfg)
  trained = posttrain.split(cfg, decls)[0]
  # A step with a non-finite gradient leaves parameters and optimizer state as
  # they were and is counted; fmjax.train.guard decides what the run does about it.
  optimizer = optax.apply_if_finite(optim.make(cfg.optimizer, cfg.train.steps, trained),
                                    max_consecutive_errors=NEVER_APPLY_NONFINITE)
  param_sh = params_lib.shardings(decls, mesh, cfg.sharding.params)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, params_lib.abstract(trained))
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract_opt, posttrain.split(cfg, param_sh)[0],
      transform_non_params=lambda _: replicated)
  model_sh = {k: v for k, v in param_sh.items() if k not in posttrain.ADDED}
  return Setup(
      cfg=cfg, mesh=mesh, decls=decls, optimizer=optimizer,
      lr_schedule=optim.schedule(cfg.optimizer, cfg.train.steps),
      state_shardings={"step": replicated, "params": param_sh, "opt_state": opt_sh},
      batch_sharding=sharding_lib.batch_sharding(mesh, cfg.sharding.activations),
      frozen_shardings={"reference": model_sh} if posttrain.needs_reference(cfg) else {})


def init_state(s: Setup, seed: int, params=None):
  """The initial state, created sharded: no parameter exists unsharded.

  With `params` (sharded like the state's), it starts from them instead of a
  random init, with a fresh optimizer state at step 0; top-level entries that
  `params` lacks (a LoRA or head that post-training adds) are initialised.
  """

  def init(key, params):
    p = params_lib.init(s.decls, key)
    if params is not None:
      p = dict(p, **params)
    trained = posttrain.split(s.cfg, p)[0]
    return {"step": jnp.zeros((), jnp.int32), "params": p,
            "opt_state": s.optimizer.init(trained)}

  with jax.set_mesh(s.mesh):
    return jax.jit(init, out_shardings=s.state_shardings)(jax.random.key(seed), params)


def _split_microbatches(batch, n: int, rules):
  """(B, ...) -> (n, B/n, ...), taking every n-th row so each shard keeps its rows."""

  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding_lib.constrain(y, (None, "batch") + (None,) * (x.ndim - 1), rules)

  return jax.tree.map(split, batch)


def _loss_fn(cfg):
  """(trained, fixed, batch, frozen) -> (summed loss, stats) of the config's objective."""
  objective = objectives.OBJECTIVES[cfg.objective.name]

  def loss(trained, fixed, batch, frozen):
    params = posttrain.model_params(dict(fixed, **trained), cfg)
    return objective(params, batch, cfg, **frozen)

  return loss


def _with_frozen(s: Setup, jitted_step, frozen):
  """The step with its frozen inputs bound: (state or params, batch) -> outputs."""
  if set(frozen or {}) != set(s.frozen_shardings):
    raise ValueError(f"objective {s.cfg.objective.name} takes frozen inputs "
                     f"{sorted(s.frozen_shardings)}, given {sorted(frozen or {})}")
  return lambda x, batch: jitted_step(x, batch, frozen)


def make_train_step(s: Setup, frozen: dict | None = None):
  """The jitted step (state, batch) -> (state, metrics); `frozen` as Setup.frozen_shardings."""
  cfg = s.cfg
  grad_fn = jax.value_and_grad(_loss_fn(cfg), has_aux=True)
  n_micro = cfg.train.microbatches

  def step(state, batch, frozen):
    trained, fixed = posttrain.split(cfg, state["params"])
    if n_micro == 1:
      (loss, stats), grads = grad_fn(trained, fixed, batch, frozen)
    else:
      def accumulate(carry, microbatch):
        (loss, stats), grads = grad_fn(trained, fixed, microbatch, frozen)
        return jax.tree.map(jnp.add, carry, (loss, grads, stats)), None

      microbatches = _split_microbatches(batch, n_micro, cfg.sharding.activations)
      (loss_shape, stats_shape), _ = jax.eval_shape(
          grad_fn, trained, fixed, jax.tree.map(lambda x: x[0], microbatches), frozen)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           (loss_shape, trained, stats_shape))
      (loss, grads, stats), _ = jax.lax.scan(accumulate, zeros, microbatches)
    denom = jnp.maximum(objectives.denominator(stats), 1.0)
    # A non-finite loss counts as a non-finite gradient, so the update is skipped.
    finite_loss = jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(finite_loss, g / denom, jnp.nan), grads)
    updates, opt_state = s.optimizer.update(grads, state["opt_state"], trained)
    stepped = dict(fixed, **optax.apply_updates(trained, updates))
    # Parameters no gradient reaches (the MoE router bias) move by the step's statistics.
    new_params, param_metrics = model.update_without_gradient(
        state["params"], stepped, stats, opt_state.notfinite_count == 0, cfg)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    metrics = dict(stats, **param_metrics, grad_norm=optax.tree.norm(grads),
                   lr=s.lr_schedule(state["step"]),
                   nonfinite_consecutive=opt_state.notfinite_count,
                   nonfinite_total=opt_state.total_notfinite)
    return new_state, metrics

  if not s.frozen_shardings and frozen is None:
    return jax.jit(lambda state, batch: step(state, batch, {}),
                   in_shardings=(s.state_shardings, s.batch_sharding),
                   out_shardings=(s.state_shardings, None), donate_argnums=0)
  return _with_frozen(s, jax.jit(
      step, in_shardings=(s.state_shardings, s.batch_sharding, s.frozen_shardings),
      out_shardings=(s.state_shardings, None), donate_argnums=0), frozen)


def make_eval_step(s: Setup, frozen: dict | None = None):
  """The jitted (params, batch) -> summed statistics; `frozen` as in make_train_step."""
  loss = _loss_fn(s.cfg)

  def stats(params, batch, frozen):
    return loss(params, {}, batch, frozen)[1]

  if not s.frozen_shardings and frozen is None:
    return jax.jit(lambda p, b: stats(p, b, {}),
                   in_shardings=(s.state_shardings["params"], s.batch_sharding))
  return _with_frozen(s, jax.jit(stats, in_shardings=(
      s.state_shardings["params"], s.batch_sharding, s.frozen_shardings)), frozen)


def global_batch(local_batch: dict, sharding) -> dict:
  """Host-local numpy rows -> one global array per key, sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def evaluate(s: Setup, eval_step, params, batches) -> dict:
  """Held-out statistics summed over `batches`.

  Each batch's sums are fetched before the next is dispatched: on fake CPU
  devices, many queued executions with collectives can deadlock XLA:CPU.
  """
  total = None
  for b in batches:
    stats = jax.device_get(eval_step(params, global_batch(b, s.batch_sharding)))
    total = stats if total is None else jax.tree.map(np.add, total, stats)
  return objectives.summarize(total)


def step_record(stats, step_time: float, tokens_per_step: int, flops_per_token: float,
                peak: float) -> dict:
  """One metrics record from a step's fetched statistics."""
  record = objectives.summarize(stats)
  tokens_per_s = tokens_per_step / step_time if step_time > 0 else 0.0
  record.update(lr=float(stats["lr"]), grad_norm=float(stats["grad_norm"]),
                tokens_per_s=tokens_per_s, step_time_s=step_time,
                mfu=tokens_per_s * flops_per_token / peak,
                nonfinite_consecutive=int(stats["nonfinite_consecutive"]),
                nonfinite_total=int(stats["nonfinite_total"]))
  record.update(moe.summarize(stats))
  return record


def run_summary(cfg, s: Setup, **extra) -> dict:
  counts = cost.param_counts(cfg.model)
  assert counts["total"] == params_lib.count(model.param_decls(cfg.model))
  return {"params": counts["total"], "non_embedding_params": counts["non_embedding"],
          "active_params": counts["active"],
          "trained_params": params_lib.count(posttrain.split(cfg, s.decls)[0]),
          "flops_per_token": cost.flops_per_token(cfg.model, cfg.data.seq_len),
          "mesh": dict(s.mesh.shape), **extra}


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
