"""A trained run read back: its config and parameters, for the tools that use a model.

`fmjax.sample`, `fmjax.task_eval` and `fmjax.export` start from a workdir: its
config.json (fields newer than the run keep their defaults) and the
parameters of one checkpoint (only the parameters: a checkpoint imported by
`fmjax.convert` has no optimizer state), restored on one device. A workdir
without either stops the command with a one-line message.
"""

from __future__ import annotations

import json
import os
import sys

import jax

from fmjax import config as config_lib
from fmjax.nn import sharding
from fmjax.train import checkpoint, state as state_lib


def load(workdir: str, prog: str, step: int | None = None):
  """(config, one-device Setup, parameters, step) of checkpoint `step` (default: the latest)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    sys.exit(f"{prog}: no config.json in --workdir={workdir}; point it at the workdir of a "
             "training run")
  cfg = config_lib.base()
  with open(path) as f:
    cfg.update(json.load(f))
  directory = checkpoint.run_directory(workdir, cfg.checkpoint.get("root", ""))
  try:
    _, latest = checkpoint.latest_checkpoint(directory)
  except FileNotFoundError:
    sys.exit(f"{prog}: no checkpoint in {directory}; train first")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  s = state_lib.setup(cfg, mesh)
  step = latest if step is None else step
  params = checkpoint.restore_params(directory, s.abstract_state["params"], step=step)
  return cfg, s, params, step
