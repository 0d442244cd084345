"""The train state and what it is built from.

State is a dict {step, params, opt_state}. Its shardings are derived from the
parameter declarations; it is created already sharded, updated by one jitted
step with donated buffers (fmjax.train.step), and checkpointed with the data
iterator's position. The optimizer state covers the trained parameters only
(all of them, or the adapters and heads under LoRA; fmjax.posttrain.plan).
Inputs that are not trained and not checkpointed (DPO's reference parameters)
are the step's `frozen` argument, sharded by `Setup.frozen_shardings`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax.nn import params as params_lib
from fmjax.nn import sharding as sharding_lib
from fmjax.nn.spec import ModelSpec
from fmjax.posttrain import plan
from fmjax.train import optim

NEVER_APPLY_NONFINITE = 2**31 - 1  # optax applies them after this many in a row


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step functions are built from: derived once from the config."""
  cfg: object
  spec: ModelSpec
  mesh: jax.sharding.Mesh
  decls: dict
  trained_keys: frozenset  # the top-level parameter entries the optimizer updates
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  state_shardings: dict
  batch_sharding: NamedSharding
  frozen_shardings: dict  # {} or {"reference": shardings like the model's parameters}

  def split(self, tree) -> tuple[dict, dict]:
    """(trained, frozen) top-level entries of a parameter tree (or of anything shaped like one)."""
    return plan.split(tree, self.trained_keys)

  @property
  def abstract_state(self):
    """Shapes, dtypes and shardings of the state: the target of a restore."""
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "params": params_lib.abstract(self.decls)}
    shapes["opt_state"] = jax.eval_shape(self.optimizer.init, self.split(shapes["params"])[0])
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)


def setup(cfg, mesh) -> Setup:
  decls = plan.param_decls(cfg)
  trained_keys = frozenset(k for k in decls if plan.is_trained(cfg, k))
  trained = plan.split(decls, trained_keys)[0]
  # A step with a non-finite gradient leaves parameters and optimizer state as
  # they were and is counted; fmjax.train.guard decides what the run does about it.
  # RL takes objective.rl.updates optimizer updates a step (fmjax.posttrain.rl).
  updates = cfg.train.steps * (cfg.objective.rl.updates if cfg.objective.name == "grpo" else 1)
  optimizer = optax.apply_if_finite(optim.make(cfg.optimizer, updates, trained),
                                    max_consecutive_errors=NEVER_APPLY_NONFINITE)
  param_sh = params_lib.shardings(decls, mesh, cfg.sharding.params)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(optimizer.init, params_lib.abstract(trained))
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract_opt, plan.split(param_sh, trained_keys)[0],
      transform_non_params=lambda _: replicated)
  return Setup(
      cfg=cfg, spec=ModelSpec.from_config(cfg), mesh=mesh, decls=decls,
      trained_keys=trained_keys, optimizer=optimizer,
      lr_schedule=optim.schedule(cfg.optimizer, updates),
      state_shardings={"step": replicated, "params": param_sh, "opt_state": opt_sh},
      batch_sharding=sharding_lib.batch_sharding(mesh, cfg.sharding.activations),
      frozen_shardings={"reference": plan.model_shardings(param_sh)}
                       if plan.needs_reference(cfg) else {})


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
    return {"step": jnp.zeros((), jnp.int32), "params": p,
            "opt_state": s.optimizer.init(s.split(p)[0])}

  with jax.set_mesh(s.mesh):
    return jax.jit(init, out_shardings=s.state_shardings)(jax.random.key(seed), params)
