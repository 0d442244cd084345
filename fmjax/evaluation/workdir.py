"""A training run's config and parameters read back, for the harness adapter.

The layers below fmjax.train (this package among them) cannot use
fmjax.train.trained_run, so this reads the same files the same way: the
workdir's config.json over the defaults, and only the parameters of one
checkpoint (default: the latest), restored with orbax onto one device. The
checkpoints live in WORKDIR/checkpoints, or under checkpoint.root
(fmjax.train.checkpoint.run_directory).
"""

from __future__ import annotations

import json
import os

import jax

from fmjax import config as config_lib
from fmjax.errors import Failure
from fmjax.nn import params as params_lib
from fmjax.posttrain import plan


def checkpoint_directory(workdir: str, root: str = "") -> str:
  if not root:
    return os.path.abspath(os.path.join(os.path.expanduser(workdir), "checkpoints"))
  rel = os.path.normpath(os.path.expanduser(workdir)).lstrip("/")
  return f"{root.rstrip('/')}/{rel}/checkpoints"


def load(workdir: str, step: int | None = None):
  """(config, parameters on one device, step). Failure, one line, if the workdir has no
  config.json or no such checkpoint."""
  import orbax.checkpoint as ocp  # only when reading a run: slow to import

  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(path):
    raise Failure(f"no config.json in workdir={workdir}; give the workdir of a training run")
  cfg = config_lib.base()  # fields newer than the run keep their defaults
  with open(path) as f:
    cfg.update(json.load(f))
  directory = checkpoint_directory(workdir, cfg.checkpoint.get("root", ""))
  if not os.path.isdir(directory) and "://" not in directory:
    raise Failure(f"no checkpoint in {directory}; train first")
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise Failure(f"no checkpoint in {directory}; train first")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise Failure(f"no checkpoint {step} in {directory}; it has {', '.join(map(str, steps))}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                    sharding=device),
                                     params_lib.abstract(plan.param_decls(cfg)))}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  return cfg, restored["state"]["params"], step
